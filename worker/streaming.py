"""Publishes generated output to job streams from a thread of its own.

The engine thread hands each piece over (text, reasoning, a call's start, more of
its arguments: worker/output_split.py) and carries on generating; this thread
writes them to Redis, batching what piled up into one pipeline, so a slow round
trip never slows the token loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from redis import Redis

from shared import job_stream
from shared.outage import REDIS, UNREACHABLE
from worker.output_split import Piece

logger = logging.getLogger(__name__)


class StreamPublisher:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: queue.Queue[tuple[str, Piece, list[dict[str, Any]] | None] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name="mlxq-stream-publisher", daemon=True)
        self._thread.start()

    def piece(self, job_id: str, piece: Piece, logprobs: list[dict[str, Any]] | None = None) -> None:
        """Queue a piece of output (and, if asked for, its tokens' logprobs) for the job's stream (any
        thread; never blocks)."""
        with self._idle:
            self._in_flight += 1
        self._pending.put((job_id, piece, logprobs))

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued piece is in Redis, so that what follows comes after it."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)

    def _run(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    item = self._pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    break
                batch.append(item)
            try:
                with self._redis.pipeline(transaction=False) as pipe:
                    for job_id, piece, logprobs in batch:
                        job_stream.append(pipe, job_id, piece.kind, None, **fields(piece, logprobs))
                    pipe.execute()
                REDIS.ok()
            except UNREACHABLE as exc:
                # Lost from the live stream only: the job's result keeps the whole text.
                REDIS.failed("publishing generated text", exc)
            except Exception:
                logger.exception("could not publish %d output pieces", len(batch))
            with self._idle:
                self._in_flight -= len(batch)
                self._idle.notify_all()


def fields(piece: Piece, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A piece as its stream entry's data (shared/job_stream.py)."""
    data: dict[str, Any]
    if piece.kind == "call":
        data = {"index": piece.index, "id": piece.id, "name": piece.name}
    elif piece.kind == "arguments":
        data = {"index": piece.index, "text": piece.text}
    else:
        data = {"text": piece.text}
    if logprobs is not None:
        data["logprobs"] = logprobs
    return data
