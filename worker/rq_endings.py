"""How a job's end is recorded in RQ: finished, failed, canceled or handed back to its queue.

The base of mlxq's worker (worker/rq_worker.py), above the outage-tolerant bookkeeping
(worker/rq_outages.py): each end waits out a Redis outage and is written once
(worker/endings.py `once`), a finished one in one transaction with its stream's end,
its counts and its drain-rate report; a job asked to stop goes to the canceled
registry, one the worker gives back (it is stopping) to the front of its queue.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.client import Pipeline
from rq import Queue
from rq.job import Job, JobStatus
from rq.job_lifecycle import call_exception_handlers
from rq.registry import CanceledJobRegistry

from shared.errors import GenerationCanceled
from shared.json_bytes import JobSerializer
from shared.outage import quietly, until_redis
from shared.settings import Settings
from worker.endings import JobEndings, job_fields, once
from worker.engine import Engine
from worker.monitor import Monitor
from worker.reports import Reports
from worker.rq_outages import OutageTolerantWorker
from worker.streaming import StreamPublisher

logger = logging.getLogger(__name__)


class EndRecordingWorker(OutageTolerantWorker):
    """RQ's end-of-job hooks, for jobs that are generations on this process's engine."""

    settings: Settings
    engine: Engine
    publisher: StreamPublisher
    endings: JobEndings
    reports: Reports
    monitor: Monitor
    _handed_back: set[str]
    """Jobs the worker stops to give back: they go to the front of their queue, not to the failed registry."""
    _canceled: set[str]
    """Jobs asked to stop: they end in RQ's canceled registry, not the failed one."""

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Any = None,
    ) -> None:
        if job.id not in self._handed_back:
            error = job.meta.get("error") or {"message": exc_string.strip().splitlines()[-1] if exc_string else ""}
            canceled = job.id in self._canceled or error.get("code") == GenerationCanceled.code
            if canceled:
                until_redis("recording a canceled job", lambda: self._record_canceled(job, execution))
            else:
                record = super().handle_job_failure
                registry = started_job_registry
                failed = once(job, JobStatus.FAILED, lambda: record(job, queue, registry, exc_string, execution))
                until_redis("recording a failed job", failed)
            self._canceled.discard(job.id)
            self.endings.failed(job, error, canceled)
            return
        self._handed_back.discard(job.id)
        job.meta.pop("error", None)  # the task recorded the interruption as a cancel

        def hand_back() -> None:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
            queue.enqueue_job(job, at_front=True)  # status and push in one transaction

        # Its pieces first: the next attempt carries on from what its stream holds, and one still on
        # its way from here would be written beside that attempt's own.
        self.publisher.drain()
        until_redis("handing a job back", once(job, JobStatus.QUEUED, hand_back))
        self.endings.handed_back(job)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Any) -> None:
        # Before the result, not only once the job has left (_perform): a client that has its answer
        # and then lists the loaded models (ollama ps) sees the model this job loaded, idle, its
        # keep-alive counting from now; written after the result, it raced the client's next request.
        # While another job still uses the model nothing listed for it changes but a count: the last
        # of them writes it (worker/monitor.py POKE_GATHER_S: what beats cost a burst).
        model = job.meta.get("model")
        if not (isinstance(model, str) and self.engine.cache.serving(model)):
            try:
                quietly("writing the heartbeat", self.monitor.beat)
            except Exception:
                logger.exception("writing the heartbeat failed")  # the job's result is recorded all the same
        result = job._result
        assert job.started_at is not None and job.ended_at is not None
        took_s = (job.ended_at - job.started_at).total_seconds()  # as RQ counts the worker's working time
        report = self.reports.ending(job.id, took_s, self.engine.batch_limit)

        def record(pipe: Pipeline) -> None:
            self.success_writes(job, execution, pipe)
            report(pipe)  # the drain rate counts it with its end, not a round trip after

        write = self.endings.finished(job, result, record)
        until_redis("recording a finished job", once(job, JobStatus.FINISHED, write))
        self.endings.child_finished(job, result)

    def _record_canceled(self, job: Job, execution: Any) -> None:
        """A canceled job goes to RQ's canceled registry, not the failed one: nothing to requeue."""
        ttl = self.settings.failure_ttl_s
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.CANCELED, pipeline=pipe)
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            registry = CanceledJobRegistry(job.origin, connection=self.connection, serializer=JobSerializer)
            registry.add(job, pipeline=pipe)
            pipe.expire(job.key, ttl)  # readable as long as a failed job would be (orphans.prune_canceled)
            pipe.execute()

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """RQ's own logs the job's arguments (the prompt) with the traceback, at ERROR even for a cancel
        or a hand-back: those are logged at INFO where they are recorded, a real failure here without
        its arguments."""
        if isinstance(exc_info[1] if len(exc_info) > 1 else None, GenerationCanceled):
            return
        call_exception_handlers(self._exc_handlers, job, *exc_info)
        logger.error(
            "job raised %s", getattr(exc_info[0], "__name__", "an error"), exc_info=exc_info, extra=job_fields(job)
        )
