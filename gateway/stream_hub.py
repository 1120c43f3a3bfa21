"""One reader for every job stream a gateway follows.

Each open stream used to hold a Redis connection for its own blocking `XREAD`, so
a hundred of them filled redis-py's pool and every other request failed. Here one
task reads all followed streams with one `XREAD` over their keys and hands each
follower its entries through a bounded buffer of its own: the connections a
gateway uses stay few and fixed however many streams are open. A follower that
does not keep up (its buffer full) is told so and ends; it never slows the reader
or the other streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from shared.outage import REDIS, RETRY_MAX_S, UNREACHABLE
from shared.text import text

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 100
"""How long one XREAD waits: a stream opened meanwhile is read from at most this much later."""

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

    def __init__(self, redis: AsyncRedis, results: Callable[[str], dict[str, Any] | None]) -> None:
        self.redis = redis
        """For everything else a follower asks (a job's status): shared, not held."""
        self._results = results
        self._subscribers: dict[str, set[Subscription]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mlxq-stream-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

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
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.stream)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.stream]

    async def _run(self) -> None:
        while True:
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
            try:
                reply = await self.redis.xread(positions, count=READ_COUNT, block=READ_BLOCK_MS)  # type: ignore[arg-type]
            except UNREACHABLE as exc:
                REDIS.failed("reading job streams", exc)
                await asyncio.sleep(RETRY_MAX_S / 4)
                continue
            except Exception:
                logger.exception("reading job streams failed")
                await asyncio.sleep(1.0)
                continue
            REDIS.ok()
            streams: list[Any] = list(reply or [])  # RESP2: [[stream, [(id, fields), ...]], ...]
            for raw_stream, entries in streams:
                self._deliver(text(raw_stream), [(text(entry_id), fields) for entry_id, fields in entries])

    def _deliver(self, stream: str, entries: list[tuple[str, dict[Any, Any]]]) -> None:
        for sub in list(self._subscribers.get(stream, ())):
            for entry_id, fields in entries:
                if _id(entry_id) <= _id(sub.delivered) or sub.overflowed:
                    continue
                try:
                    sub.queue.put_nowait((entry_id, fields))
                except asyncio.QueueFull:
                    sub.overflowed = True  # its follower ends the stream; the others go on
                    continue
                sub.delivered = entry_id
