"""Following a job's stream (shared/job_stream.py) from the gateway, without holding a thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.streams.hub import StreamHub, Subscription
from gateway.streams.tally import Tally
from shared import job_stream, keys
from shared.outage import REDIS, RETRY_MAX_S, UNREACHABLE
from shared.text import text

STREAM_ID = r"^\d{1,19}-\d{1,19}$"
"""A Redis stream id as a client may send one back (`Last-Event-ID`, a cursor): 19 digits a part at
most keeps it below Redis's 64-bit limit, so no well-formed id makes Redis refuse."""

BLOCK_MS = 1000
"""How long a quiet follower first waits before it looks at the job's own status (in case the job
ended without its stream saying so); each look that finds it still going doubles the wait, up to
CHECK_MAX_S, so a thousand followers of queued jobs cost Redis little."""

CHECK_MAX_S = 8.0

PING_S = 5.0
"""A follower that asks for pings gets one after this long without an entry: an SSE comment keeps
proxies and clients from dropping a stream that waits in the queue."""

_ENDED = {"finished": "finished", "failed": "failed", "stopped": "canceled", "canceled": "canceled"}


@dataclass(frozen=True)
class Entry:
    id: str
    kind: str
    data: dict[str, Any]


class WaitedTooLong(Exception):
    """The deadline given to `follow` passed before the job ended."""


class FellBehind(Exception):
    """The follower left more of the stream unread than its buffer holds (gateway/streams/hub.py)."""


async def follow(
    streams: StreamHub,
    job_id: str,
    after: str = "0-0",
    deadline: float | None = None,
    pings: bool = False,
    exact: bool = True,
) -> AsyncIterator[Entry]:
    """Entries after `after`, as they come, up to and including the job's end.

    If the stream has expired (or a crash cut it short) while the job has ended, an end is
    made up from the job's RQ status, so a follower never waits forever. Past `deadline`
    (time.monotonic()) it raises WaitedTooLong; each read blocks no longer than what is
    left, so no read has to be cancelled half-way. With `pings`, a `ping` entry comes after
    each PING_S without another. Entries come through the gateway's one stream reader; a
    follower that falls too far behind raises FellBehind. Output comes exactly as the job's result
    has it (gateway/streams/tally.py); `exact=False`, for one that only waits for the end, passes the
    entries as they are.
    """
    stream = keys.job_stream(job_id)
    tally = Tally(exact=exact)
    if exact and after != "0-0":
        # Resuming: what came up to `after` was sent on an earlier connection.
        for _, fields in await _before(streams, stream, after):
            tally.take(*job_stream.decode(fields))
    sub = streams.subscribe(stream, after)
    try:
        async for entry in _follow(streams, sub, tally, job_id, deadline, pings):
            yield entry
    finally:
        streams.unsubscribe(sub)


async def _before(streams: StreamHub, stream: str, after: str) -> list[Any]:
    while True:
        try:
            return list(await streams.redis.xrange(stream, "-", after) or [])
        except UNREACHABLE as exc:
            REDIS.failed("following a job", exc)
            await asyncio.sleep(RETRY_MAX_S)


async def _follow(
    streams: StreamHub, sub: Subscription, tally: Tally, job_id: str, deadline: float | None, pings: bool
) -> AsyncIterator[Entry]:
    redis, stream, last = streams.redis, sub.stream, sub.delivered
    shown = last
    """`last` is how far the stream was read; `shown`, the last entry sent on (they part at a gap)."""
    quiet_since = checked_at = time.monotonic()
    check_s = BLOCK_MS / 1000
    while True:
        now = time.monotonic()
        if pings and now - quiet_since >= PING_S:
            quiet_since = now
            yield Entry(shown, "ping", {})
        wait_s = max(0.0, checked_at + check_s - now)
        if pings:
            wait_s = min(wait_s, PING_S - (now - quiet_since))
        if deadline is not None:
            if deadline - now <= 0:
                raise WaitedTooLong(job_id)
            wait_s = min(wait_s, deadline - now)
        raw = await sub.next(max(wait_s, 0.001))
        if sub.overflowed and not raw:
            raise FellBehind(job_id)
        if raw:
            quiet_since = checked_at = time.monotonic()
            check_s = BLOCK_MS / 1000
            for raw_id, fields in raw:
                for kind, data in tally.take(*job_stream.decode(fields)):
                    # What fills a gap goes out under the last id shown: a client resuming from
                    # there meets the gap again and is sent the same.
                    yield Entry(raw_id if kind == "end" or not tally.gap else shown, kind, data)
                    if kind == "end":
                        return
                last = raw_id
                if not tally.gap:
                    shown = raw_id
            continue
        if time.monotonic() < checked_at + check_s:
            continue  # a ping or the deadline, not yet a look at the status
        checked_at, check_s = time.monotonic(), min(check_s * 2, CHECK_MAX_S)
        try:
            status = await redis.hget(f"rq:job:{job_id}", "status")
        except UNREACHABLE as exc:
            # Redis is away: keep the client's connection and pick up where the stream was once it is back.
            REDIS.failed("following a job", exc)
            await asyncio.sleep(RETRY_MAX_S)
            continue
        REDIS.ok()
        ended = _ENDED.get(text(status)) if status is not None else "failed"
        if ended is not None:
            # One more look: the end may have been written just now (the reader brings it soon).
            try:
                if await redis.xread({stream: last}, count=1) or not sub.queue.empty():
                    continue
            except UNREACHABLE as exc:
                REDIS.failed("following a job", exc)
                continue
            result = await streams.result_of(job_id) if ended == "finished" else None
            made_up: dict[str, Any] = {"status": "finished", "result": result}
            if result is None:
                message = f"the job ended as {ended}"
                if ended == "finished":  # its result gone too (expired): nothing to answer with
                    ended, message = "failed", "the job finished, but its result has expired"
                made_up = {"status": ended, "error": {"message": message}}
            for kind, data in tally.take("end", made_up):
                yield Entry(shown, kind, data)
            return
