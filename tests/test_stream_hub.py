"""The gateway's one reader of job streams (gateway/streams/hub.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis as AsyncRedis

from gateway.streams.hub import StreamHub
from shared import keys
from shared.text import text


async def written(redis: AsyncRedis, stream: str, fields: dict[str, str | int], noticed: bool = True) -> str:
    """An entry, with the notice every writer adds beside it (shared/job_stream.py), or without it (lost)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
        if noticed:
            pipe.xadd(keys.STREAMS_WRITTEN, {"k": stream})
        entry_id, *_ = await pipe.execute()
    return text(entry_id)


async def blocked(redis: AsyncRedis) -> None:
    """Until a client (the reader) is blocked in its XREAD."""
    while int((await redis.info("clients"))["blocked_clients"]) < 1:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("order", ["added, then opened", "opened, then added"])
def test_a_stream_opened_while_the_reader_blocks_is_read_without_waiting_for_the_read_to_end(
    scratch_redis_url: str, order: str
) -> None:
    """The reader blocks for 30 s on another stream; a stream opened meanwhile gets its entries at once,
    whether they were there before it was opened or come after."""

    async def scenario() -> None:
        redis = AsyncRedis.from_url(scratch_redis_url)  # the test's own, as a worker's writes would be
        reader = AsyncRedis.from_url(scratch_redis_url, socket_timeout=60)  # longer than its reads block
        hub = StreamHub(reader, lambda job_id: None, block_ms=30_000, sweep_s=30)
        hub.start()
        try:
            hub.subscribe("mlxq:test:quiet", "0-0")
            await asyncio.wait_for(blocked(redis), 10)
            started = time.monotonic()
            if order == "added, then opened":
                await written(redis, "mlxq:test:new", {"text": "first"})
                sub = hub.subscribe("mlxq:test:new", "0-0")
            else:
                sub = hub.subscribe("mlxq:test:new", "0-0")
                await written(redis, "mlxq:test:new", {"text": "first"})
            [(_, fields)] = await sub.next(timeout_s=15)  # [] when it waits for the 30 s read to end
            assert fields[b"text"] == b"first"
            assert time.monotonic() - started < 15
        finally:
            await hub.stop()
            await hub.redis.aclose()
            await redis.aclose()

    asyncio.run(scenario())


def test_a_second_follower_from_the_start_gets_every_entry_while_the_first_is_read_further_on(
    scratch_redis_url: str,
) -> None:
    """One follower has read a stream's first entries and the reader blocks past them; a second opens the
    same stream from its start (a reconnect, another client of the job): it gets those entries too, at
    once, and then what follows, with no gap."""

    async def scenario() -> None:
        redis = AsyncRedis.from_url(scratch_redis_url)
        reader = AsyncRedis.from_url(scratch_redis_url, socket_timeout=60)
        hub = StreamHub(reader, lambda job_id: None, block_ms=30_000, sweep_s=30)
        hub.start()
        try:
            first_ids = [await written(redis, "mlxq:test:job", {"n": n}) for n in (1, 2)]
            first = hub.subscribe("mlxq:test:job", "0-0")
            assert len(await first.next(timeout_s=10)) == 2
            await asyncio.wait_for(blocked(redis), 10)  # now reading on from the second entry
            second = hub.subscribe("mlxq:test:job", "0-0")
            early = await second.next(timeout_s=15)  # not after the 30 s read
            await written(redis, "mlxq:test:job", {"n": 3})
            got = early + await second.next(timeout_s=15)
            while len(got) < 3 and (more := await second.next(timeout_s=15)):
                got += more
            assert [fields[b"n"] for _, fields in got] == [b"1", b"2", b"3"]
            assert [entry_id for entry_id, _ in got[:2]] == first_ids
        finally:
            await hub.stop()
            await reader.aclose()
            await redis.aclose()

    asyncio.run(scenario())


def test_the_reader_reads_the_streams_that_notices_name_and_sweeps_for_a_lost_notice(scratch_redis_url: str) -> None:
    """With the sweep 30 s away, an entry arrives by its notice while the reader blocks on notices; an entry
    whose notice was lost (Redis came back without it) arrives by the next sweep, not never."""

    async def scenario(sweep_s: float) -> list[bytes]:
        redis = AsyncRedis.from_url(scratch_redis_url)
        reader = AsyncRedis.from_url(scratch_redis_url, socket_timeout=60)
        hub = StreamHub(reader, lambda job_id: None, block_ms=30_000, sweep_s=sweep_s)
        hub.start()
        try:
            stream = f"mlxq:test:noticed:{sweep_s}"
            sub = hub.subscribe(stream, "0-0")
            await asyncio.wait_for(blocked(redis), 10)
            await written(redis, stream, {"n": 1})
            got = await sub.next(timeout_s=15)  # [] when it waited for the 30 s read
            await asyncio.wait_for(blocked(redis), 10)
            await written(redis, stream, {"n": 2}, noticed=False)
            got += await sub.next(timeout_s=2 if sweep_s > 2 else 15)  # long enough to read a noticed entry
            return [fields[b"n"] for _, fields in got]
        finally:
            await hub.stop()
            await reader.aclose()
            await redis.aclose()

    assert asyncio.run(scenario(sweep_s=30)) == [b"1"]  # the lost notice's entry waits for the sweep
    assert asyncio.run(scenario(sweep_s=0.5)) == [b"1", b"2"]  # which brings it
