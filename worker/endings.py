"""How a job's end is told: its stream's last entry, the batch's progress, the counters, one log line.

The text still buffered goes out first, then the stream's end (so a follower sees
exactly the job's result). A finished job's end is one transaction with RQ's record
of it and its counts (worker/rq_worker.py); a failed or canceled one's stream end
follows RQ's record, its count is best effort. Each write that would lose the end
waits out a Redis outage, and is retried only if it did not land (`once`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from shared import batch_progress, events, job_stream, keys, stats
from shared.outage import quietly, until_redis
from worker.streaming import StreamPublisher

logger = logging.getLogger(__name__)


class JobEndings:
    """Tells the end of each of a worker's jobs."""

    def __init__(self, connection: Redis, worker: str, publisher: StreamPublisher, stream_ttl_s: int) -> None:
        self.connection = connection
        self.worker = worker
        self.publisher = publisher
        self.stream_ttl_s = stream_ttl_s

    def finished(self, job: Job, result: Any, record: Callable[[Pipeline], None]) -> Callable[[], None]:
        """The writes that end a finished job, for until_redis: RQ's record of it (`record` adds it), its
        stream's end and its counts in one transaction, one round trip between the answer and a client
        waiting for it. The text still buffered is written first, so a follower sees it before the end."""

        def write() -> None:
            self.publisher.flush()
            with self.connection.pipeline() as pipe:
                record(pipe)
                job_stream.add(pipe, job.id, "end", self.stream_ttl_s, status="finished", result=result)
                job_stream.notice(pipe, [keys.job_stream(job.id)])
                stats.count(pipe, keys.STATS_JOBS, "finished")
                if isinstance(result, dict) and "timings" in result:
                    stats.record_generation(pipe, result, result["timings"].get("first_token_s"))
                pipe.execute()

        return write

    def child_finished(self, job: Job, result: Any) -> None:
        """A finished job that is a batch's child, recorded in its batch (once its own end is written)."""
        until_redis(
            "recording a batch child's end",
            lambda: batch_progress.child_ended(self.connection, job, "finished", self.stream_ttl_s, result=result),
        )

    def failed(self, job: Job, error: dict[str, Any], canceled: bool) -> None:
        """A job that ended without a result: failed, or canceled (logged at INFO, it is no fault)."""
        status = "canceled" if canceled else "failed"
        self.publisher.flush()
        until_redis(
            "ending a job's stream",
            lambda: batch_progress.job_ended(self.connection, job, status, self.stream_ttl_s, error=error),
        )
        quietly("counting a job", lambda: stats.count(self.connection, keys.STATS_JOBS, status))
        log = logger.info if canceled else logger.warning
        log("job %s: %s", status, error.get("code", ""), extra=job_fields(job))

    def handed_back(self, job: Job) -> None:
        """A running job went back to the front of its queue (the worker is stopping)."""
        self.publisher.flush()
        quietly(
            "writing a job's stream",
            lambda: job_stream.append(self.connection, job.id, "status", self.stream_ttl_s, status="queued"),
        )
        quietly(
            "emitting an event",
            lambda: events.emit(self.connection, "job_handed_back", job_id=job.id, worker=self.worker),
        )
        logger.info("handed the running job back to the front of its queue", extra={"job_id": job.id})


def job_fields(job: Job) -> dict[str, Any]:
    """The fields every job lifecycle log line carries (never the prompt)."""
    return {"job_id": job.id, "model": job.meta.get("model"), "queue": job.origin}


def once(job: Job, done: JobStatus, write: Callable[[], None]) -> Callable[[], None]:
    """`write` (a job's end or hand-back, in one MULTI/EXEC) for until_redis, made safe to retry: Redis
    can die after the EXEC and before its reply, so the write is in (the AOF has it) while this side
    saw an error; a second write would add a second result or push the job twice. A retry first asks
    whether the job already shows `done` (or is gone: only RQ's own end removes its hash)."""
    tried = False

    def attempt() -> None:
        nonlocal tried
        if tried:
            try:
                if job.get_status(refresh=True) == done:
                    return
            except NoSuchJobError:
                return
        tried = True
        write()

    return attempt
