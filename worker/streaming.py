"""Publishes generated output to job streams from a thread of its own.

The engine thread hands each piece over (text, reasoning, a call's start, more of
its arguments: worker/output_split.py) and carries on generating; this thread
writes them to Redis, batching what piled up into one pipeline, so a slow round
trip never slows the token loop. While Redis is away the pieces wait here and go
out in order once it is back: a follower sees them late, never missing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any

from redis import Redis

from shared import job_stream, keys
from shared.outage import REDIS, RETRY_MAX_S, UNREACHABLE
from worker.rows import Sent

logger = logging.getLogger(__name__)


MAX_WAITING = 200_000
"""Pieces kept through a Redis outage (a few hundred bytes each). Past it the newest are dropped:
followers see the gap and take the rest from the job's result (gateway/streams/following.py)."""


FIRST_WRITTEN_KEPT = 4096
"""Jobs whose first write time is kept for their end: far more than a worker runs at once."""


class StreamPublisher:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: queue.Queue[tuple[str, Sent] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._in_flight = 0
        self._first_written: OrderedDict[str, float] = OrderedDict()
        """When each job's first piece reached Redis (time.time()), until `first_written` takes it (a job
        that failed never does: the oldest go past FIRST_WRITTEN_KEPT)."""
        self._thread = threading.Thread(target=self._run, name="mlxq-stream-publisher", daemon=True)
        self._thread.start()

    def piece(self, job_id: str, sent: Sent) -> None:
        """Queue a piece of output for the job's stream (any thread; never blocks)."""
        with self._idle:
            self._in_flight += 1
        self._pending.put((job_id, sent))

    def first_written(self, job_id: str) -> float | None:
        """When the job's first piece reached its stream (time.time()); None when none did. Asked once,
        at the job's end."""
        return self._first_written.pop(job_id, None)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued piece is in Redis, so that what follows comes after it; False when
        `timeout_s` passed first (Redis away: they are still kept)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)

    def drain(self) -> None:
        """Wait until every queued piece is in Redis, however long Redis is away."""
        while not self.flush(1.0):
            pass

    def _run(self) -> None:
        batch: list[tuple[str, Sent]] = []
        delay_s = 0.05
        while True:
            if not batch:
                first = self._pending.get()
                if first is None:
                    return
                batch.append(first)
            dropped = self._take_waiting(batch)
            try:
                with self._redis.pipeline(transaction=False) as pipe:
                    for job_id, sent in batch:
                        job_stream.add(pipe, job_id, sent.piece.kind, None, **fields(sent))
                    job_stream.notice(pipe, [keys.job_stream(job_id) for job_id in dict.fromkeys(j for j, _ in batch)])
                    pipe.execute()
                REDIS.ok()
                written = time.time()
                for job_id, _ in batch:
                    self._first_written.setdefault(job_id, written)
                while len(self._first_written) > FIRST_WRITTEN_KEPT:
                    self._first_written.popitem(last=False)
            except UNREACHABLE as exc:
                # Kept, in order, for when Redis is back. A write that did land before the connection
                # broke lands twice: followers drop the repeat by its `seq`.
                REDIS.failed("publishing generated text", exc)
                self._done(dropped)
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)
                continue
            except Exception:
                logger.exception("could not publish %d output pieces", len(batch))
            delay_s = 0.05
            self._done(len(batch) + dropped)
            batch = []

    def _take_waiting(self, batch: list[tuple[str, Sent]]) -> int:
        """Move what is queued onto `batch`, up to MAX_WAITING; how many were dropped past it."""
        dropped = 0
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                return dropped
            if item is None:
                self._pending.put(None)
                return dropped
            if len(batch) < MAX_WAITING:
                batch.append(item)
            else:
                dropped += 1

    def _done(self, count: int) -> None:
        if count:
            with self._idle:
                self._in_flight -= count
                self._idle.notify_all()


def fields(sent: Sent) -> dict[str, Any]:
    """A piece as its stream entry's data (shared/job_stream.py)."""
    piece = sent.piece
    data: dict[str, Any]
    if piece.kind == "call":
        data = {"index": piece.index, "id": piece.id, "name": piece.name}
    elif piece.kind == "arguments":
        data = {"index": piece.index, "text": piece.text}
    else:
        data = {"text": piece.text}
    if sent.logprobs is not None:
        data["logprobs"] = sent.logprobs
    data["seq"], data["tokens"] = sent.seq, sent.tokens
    if sent.final is not None:
        data["final"] = sent.final
    return data
