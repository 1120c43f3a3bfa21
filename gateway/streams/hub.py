"""One reader for every job stream a gateway follows.

Each open stream used to hold a Redis connection for its own blocking `XREAD`, so
a hundred of them filled redis-py's pool and every other request failed. Here one
task reads for every follower and hands each its entries through a bounded buffer
of its own: the connections a gateway uses stay few and fixed however many streams
are open. A follower that does not keep up (its buffer full) is told so and ends;
it never slows the reader or the other streams.

The reader blocks on the notices that writers add beside their entries
(`keys.STREAMS_WRITTEN`, shared/job_stream.py `notice`) and reads only the
streams they name that it follows: one `XREAD` over every followed stream on
every token cost a thousand open streams most of the gateway's time (and Redis's).
A stream just opened is read at once, and every followed stream is read once a
`SWEEP_S` all the same, so a notice lost (Redis came back without it, or trimmed
it before a slow reader got to it) delays its stream, never loses an entry.

A stream opened while the reader blocks: the reader reads a wake stream of its own
beside the notices, and opening a stream adds an entry to it, so the blocked read
ends at once and the next one includes the new stream. An entry added before the
read blocks ends it as well (it is read from the last id seen, not from "now").
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from shared import keys
from shared.outage import REDIS, RETRY_MAX_S, UNREACHABLE
from shared.text import text

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 100
"""How long one XREAD waits when nothing arrives and no stream opens (an opening wakes it at once)."""

SWEEP_S = 1.0
"""Every followed stream is read at least this often, noticed or not."""

READ_COUNT = 200
"""Entries read per stream at a time (notices too)."""

READ_STREAMS = 500
"""Streams one XREAD names at most (a sweep of more takes several)."""

BUFFER_ENTRIES = 20_000
"""Entries a follower may leave unread before it is cut off (about a long answer's tokens)."""


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Subscription:
    """One follower of one stream: its entries arrive in `queue` in order."""

    stream: str
    delivered: str
    """The id of the last entry handed to it (or where it asked to start)."""
    queue: asyncio.Queue[tuple[str, dict[Any, Any]]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=BUFFER_ENTRIES)
    )
    overflowed: bool = False

    async def next(self, timeout_s: float) -> list[tuple[str, dict[Any, Any]]]:
        """What arrived, waiting up to `timeout_s` for the first of it; [] when nothing did."""
        if self.queue.empty():
            # A timeout scope, not wait_for: on Python 3.11 wait_for makes a task of each get, a third of
            # what handing an entry to its follower costs (12 against 4 us a call, measured alone).
            try:
                async with asyncio.timeout(timeout_s):
                    batch = [await self.queue.get()]
            except TimeoutError:
                return []
        else:
            batch = []
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch


class StreamHub:
    """Reads the followed streams that notices name, and fans their entries out in memory."""

    def __init__(
        self,
        redis: AsyncRedis,
        results: Callable[[str], dict[str, Any] | None],
        block_ms: int = READ_BLOCK_MS,
        sweep_s: float = SWEEP_S,
    ) -> None:
        self.redis = redis
        """For everything else a follower asks (a job's status): shared, not held."""
        self._results = results
        self._block_ms = block_ms
        self._sweep_s = sweep_s
        self._subscribers: dict[str, set[Subscription]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake_key = keys.hub_wake(uuid.uuid4().hex)
        self._woken_at = "0-0"
        """The last wake entry the reader has seen."""
        self._noticed_at: str | None = None
        """The last notice the reader has seen; None until it has asked Redis where they end."""
        self._due: set[str] = set()
        """Followed streams to read next: noticed, opened, left with more to read, or swept."""
        self._swept_at = 0.0
        self._notices_behind = False
        """The last read brought a full count of notices: more wait, so the next read does not block."""
        self._blocking = False
        """An XREAD that blocks is in flight."""
        self._reads = 0
        """XREADs begun so far; one wake ends one of them."""
        self._to_end = -1
        """The latest blocking read a stream opened during, that a wake must end (-1: none)."""
        self._nudging: asyncio.Task[None] | None = None
        """The one wake on its way, if any: a thousand streams opening at once take one connection."""
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mlxq-stream-hub")

    async def stop(self) -> None:
        self._stopping = True  # redis-py may turn the cancel of a blocked read into a timeout: not retried
        if self._blocking:
            await self._nudge()  # its blocked read ends now, and the loop with it
        pending = [task for task in (self._nudging, self._task) if task is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def result_of(self, job_id: str) -> dict[str, Any] | None:
        """A finished job's result from RQ, for a stream that expired or lost its end (RQ's own
        reading of it, on a thread: its client is synchronous)."""
        try:
            return await asyncio.to_thread(self._results, job_id)
        except UNREACHABLE as exc:
            REDIS.failed("reading a job's result", exc)
            return None

    def subscribe(self, stream: str, after: str) -> Subscription:
        sub = Subscription(stream, after)
        self._subscribers.setdefault(stream, set()).add(sub)
        self._due.add(stream)
        self._wake.set()
        if self._blocking:
            self._to_end = self._reads
            if self._nudging is None:
                self._nudging = asyncio.get_running_loop().create_task(self._wake_reader())
        return sub

    async def _wake_reader(self) -> None:
        """Wakes until no read that a stream opened during is left to end: a wake sent ends the read it
        was sent for (or, reaching Redis first, the one after), and streams opened while it was on its
        way are in the reads that follow unless one opened during a later read, which takes one more."""
        try:
            while self._to_end >= 0:
                sent_for, self._to_end = self._to_end, -1
                await self._nudge()
                if self._to_end == sent_for:
                    self._to_end = -1  # opened during the read this wake ends
        finally:
            self._nudging = None

    async def _nudge(self) -> None:
        """Ends the reader's blocked XREAD: an entry in its wake stream."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": 1}, maxlen=keys.HUB_WAKE_MAXLEN, approximate=True)
                pipe.expire(self._wake_key, keys.HUB_WAKE_TTL_S)
                await pipe.execute()
        except UNREACHABLE as exc:
            REDIS.failed("waking the stream reader", exc)  # the read's own timeout still comes

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.stream)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.stream]

    async def _run(self) -> None:
        while not self._stopping:
            if not self._subscribers:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._noticed_at is None:
                    self._noticed_at = await self._notices_end()
                await self._read_once()
            except UNREACHABLE as exc:
                if self._stopping:
                    return
                REDIS.failed("reading job streams", exc)
                self._swept_at = 0.0  # Redis may have come back without the notices written meanwhile
                await asyncio.sleep(RETRY_MAX_S / 4)
            except Exception:
                if self._stopping:
                    return
                logger.exception("reading job streams failed")
                self._swept_at = 0.0
                await asyncio.sleep(1.0)
            else:
                REDIS.ok()

    async def _notices_end(self) -> str:
        """The id of the newest notice ("0-0" when there is none): the reader follows the notices from there."""
        newest = await self.redis.xrevrange(keys.STREAMS_WRITTEN, count=1)
        return text(newest[0][0]) if newest else "0-0"

    async def _read_once(self) -> None:
        """One XREAD: of the streams due, if any, else blocking on the notices and the wake stream."""
        now = time.monotonic()
        if now - self._swept_at >= self._sweep_s:
            self._swept_at = now
            self._due.update(self._subscribers)
        reading: dict[str, str] = {}
        while self._due and len(reading) < READ_STREAMS:
            stream = self._due.pop()
            live = [sub.delivered for sub in self._subscribers.get(stream, ()) if not sub.overflowed]
            if live:
                reading[stream] = min(live, key=_id)
        block: int | None = None
        if not reading and not self._notices_behind:
            until_sweep_ms = int(1000 * (self._swept_at + self._sweep_s - now)) + 1
            block = max(1, min(self._block_ms, until_sweep_ms))
        assert self._noticed_at is not None
        self._blocking, self._reads = block is not None, self._reads + 1
        try:
            reply = await self.redis.xread(
                {**reading, keys.STREAMS_WRITTEN: self._noticed_at, self._wake_key: self._woken_at},  # type: ignore[dict-item]
                count=READ_COUNT,
                block=block,
            )
        except BaseException:
            self._due.update(reading)  # read again once Redis answers
            raise
        finally:
            self._blocking = False
        self._notices_behind = False
        streams: list[Any] = list(reply or [])  # RESP2: [[stream, [(id, fields), ...]], ...]
        for raw_stream, entries in streams:
            stream, read = text(raw_stream), [(text(entry_id), fields) for entry_id, fields in entries]
            if stream == self._wake_key:
                self._woken_at = read[-1][0]
            elif stream == keys.STREAMS_WRITTEN:
                self._noticed_at = read[-1][0]
                self._notices_behind = len(read) >= READ_COUNT
                for _, fields in read:
                    named = text(fields.get(b"k", fields.get("k", b""))).split()
                    self._due.update(written for written in named if written in self._subscribers)
            else:
                self._deliver(stream, read, reading[stream])
                if len(read) >= READ_COUNT:
                    self._due.add(stream)  # more to read

    def _deliver(self, stream: str, entries: list[tuple[str, dict[Any, Any]]], read_from: str) -> None:
        """`entries` (those after `read_from`) to each follower that has all before them; one that joined
        the read asking for earlier ones gets them, and these, from the next read."""
        behind = False
        for sub in list(self._subscribers.get(stream, ())):
            if _id(sub.delivered) < _id(read_from):
                behind = True
                continue
            for entry_id, fields in entries:
                if _id(entry_id) <= _id(sub.delivered) or sub.overflowed:
                    continue
                try:
                    sub.queue.put_nowait((entry_id, fields))
                except asyncio.QueueFull:
                    sub.overflowed = True  # its follower ends the stream; the others go on
                    continue
                sub.delivered = entry_id
        if behind:
            self._due.add(stream)
