"""How Redis's troubles look to each process, against a real redis-server: a gateway whose pool is in
use to the last connection is busy, not facing an outage; a refusal (OOM here) is an outage that fails
at once, without redis-py's reconnecting retries."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.outage import UNREACHABLE, Outage, pool_exhausted
from shared.redis_errors import RedisOutOfMemory, RedisUnblocked, condition_of
from tests.support.redis_servers import RedisServer, free_port


def test_a_pool_that_stays_full_is_not_an_outage(redis_server: RedisServer) -> None:
    async def exhaust() -> BaseException:
        pool = BlockingConnectionPool.from_url(redis_server.url, max_connections=1, timeout=0.2)
        client = AsyncRedis(connection_pool=pool)
        held = await pool.get_connection()
        try:
            with pytest.raises(RedisConnectionError) as caught:
                await client.get("anything")
            return caught.value
        finally:
            await pool.release(held)
            await client.aclose()

    error = asyncio.run(exhaust())
    assert pool_exhausted(error)
    outage = Outage()
    outage.failed("answering a request", error)
    assert not outage.down


def test_redis_away_is_an_outage() -> None:
    async def unreachable() -> BaseException:
        client = AsyncRedis.from_url(f"redis://127.0.0.1:{free_port()}/0")
        try:
            with pytest.raises(RedisConnectionError) as caught:
                await client.get("anything")
            return caught.value
        finally:
            await client.aclose()

    error = asyncio.run(unreachable())
    assert not pool_exhausted(error)
    outage = Outage()
    outage.failed("answering a request", error)
    assert outage.down


def test_a_refusal_fails_at_once_on_its_connection_without_redis_py_retrying_it(tmp_path: Path) -> None:
    """A refusal is no ConnectionError to redis-py: it neither reconnects nor runs a pipeline again."""
    server = RedisServer(tmp_path)
    try:
        redis = Redis.from_url(server.url)
        redis.rpush("items", *range(5))
        redis.config_set("maxmemory", 1)
        before = int(redis.info("stats")["total_connections_received"])
        with pytest.raises(RedisOutOfMemory) as caught:
            redis.pipeline(transaction=False).lpop("items").set("grow", "x" * 1000).execute()
        assert isinstance(caught.value, UNREACHABLE) and "out of memory" in condition_of(caught.value)
        assert int(redis.info("stats")["total_connections_received"]) == before  # no reconnection
        redis.config_set("maxmemory", 0)
        assert redis.llen("items") == 4  # the pipeline ran once
    finally:
        server.stop()


def test_a_blocking_pop_cut_short_by_a_role_change_is_a_refusal_waited_out(tmp_path: Path) -> None:
    """The worker waits for jobs in BLPOP; Redis made a replica meanwhile answers it UNBLOCKED, which
    killed RQ's loop (the worker restarted, test_redis_refusals caught it) until it was an outage."""
    server = RedisServer(tmp_path)
    try:
        blocked, admin = Redis.from_url(server.url), Redis.from_url(server.url)
        caught: list[BaseException] = []

        def wait_for_jobs() -> None:
            try:
                blocked.blpop(["wake"], 30)
            except Exception as exc:
                caught.append(exc)

        waiter = threading.Thread(target=wait_for_jobs)
        waiter.start()
        while int(admin.info("clients")["blocked_clients"]) < 1:
            time.sleep(0.01)
        admin.replicaof("127.0.0.1", free_port())
        waiter.join(10)
        admin.replicaof("NO", "ONE")
        [error] = caught
        assert isinstance(error, RedisUnblocked) and isinstance(error, UNREACHABLE)
        assert "UNBLOCKED" in condition_of(error)
    finally:
        server.stop()
