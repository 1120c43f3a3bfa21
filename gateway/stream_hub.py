"""One reader for every job stream a gateway follows.

Each open stream used to hold a Redis connection for its own blocking `XREAD`, so
a hundred of them filled redis-py's pool and every other request failed. Here one
task reads all followed streams with one `XREAD` over their keys and hands each
follower its entries through a bounded buffer of its own: the connections a
gateway uses stay few and fixed however many streams are open. A follower that
does not keep up (its buffer full) is told so and ends; it never slows the reader
or the other streams.

A stream opened while that `XREAD` blocks is not in it: the reader reads a wake
stream of its own beside the job streams, and opening a stream adds an entry to
it, so the blocked read ends at once and the next one includes the new stream.
An entry added before the read blocks ends it as well (it is read from the last
id seen, not from "now"), so no opening waits for a read's timeout.
"""

from __future__ import annotations

import asyncio
import logging
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

READ_COUNT = 200
"""Entries read per stream at a time."""

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
        try:
            first = await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return []
        batch = [first]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch


class StreamHub:
    """Reads every followed stream with one XREAD and fans the entries out in memory."""

    def __init__(
        self, redis: AsyncRedis, results: Callable[[str], dict[str, Any] | None], block_ms: int = READ_BLOCK_MS
    ) -> None:
        self.redis = redis
        """For everything else a follower asks (a job's status): shared, not held."""
        self._results = results
        self._block_ms = block_ms
        self._subscribers: dict[str, set[Subscription]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake_key = keys.hub_wake(uuid.uuid4().hex)
        self._woken_at = "0-0"
        """The last wake entry the reader has seen."""
        self._reading: dict[str, str] = {}
        """The job streams of the XREAD in flight and where it reads each from (empty when none is)."""
        self._reads = 0
        """XREADs begun so far; one wake ends one of them."""
        self._to_end = -1
        """The latest read a stream opened during, that a wake must end (-1: none)."""
        self._nudging: asyncio.Task[None] | None = None
        """The one wake on its way, if any: a thousand streams opening at once take one connection."""
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mlxq-stream-hub")

    async def stop(self) -> None:
        self._stopping = True  # redis-py may turn the cancel of a blocked read into a timeout: not retried
        if self._reading:
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
        self._wake.set()
        reading = self._reading.get(stream)
        behind = reading is None or _id(after) < _id(reading)  # not read, or read from later than it asks
        if self._reading and behind:
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
            positions = {
                stream: min(live, key=_id)
                for stream, subs in self._subscribers.items()
                if (live := [sub.delivered for sub in subs if not sub.overflowed])
            }
            if not positions:
                await asyncio.sleep(READ_BLOCK_MS / 1000)  # only cut-off followers, on their way out
                continue
            self._reading = dict(positions)
            self._reads += 1
            try:
                reply = await self.redis.xread(
                    {**positions, self._wake_key: self._woken_at},  # type: ignore[dict-item]
                    count=READ_COUNT,
                    block=self._block_ms,
                )
            except UNREACHABLE as exc:
                if self._stopping:
                    return
                REDIS.failed("reading job streams", exc)
                await asyncio.sleep(RETRY_MAX_S / 4)
                continue
            except Exception:
                if self._stopping:
                    return
                logger.exception("reading job streams failed")
                await asyncio.sleep(1.0)
                continue
            finally:
                read_from, self._reading = self._reading, {}
            REDIS.ok()
            streams: list[Any] = list(reply or [])  # RESP2: [[stream, [(id, fields), ...]], ...]
            for raw_stream, entries in streams:
                stream, read = text(raw_stream), [(text(entry_id), fields) for entry_id, fields in entries]
                if stream == self._wake_key:
                    self._woken_at = read[-1][0]
                else:
                    self._deliver(stream, read, read_from[stream])

    def _deliver(self, stream: str, entries: list[tuple[str, dict[Any, Any]]], read_from: str) -> None:
        """`entries` (those after `read_from`) to each follower that has all before them; one that joined
        the read asking for earlier ones gets them, and these, from the next read."""
        for sub in list(self._subscribers.get(stream, ())):
            if _id(sub.delivered) < _id(read_from):
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
