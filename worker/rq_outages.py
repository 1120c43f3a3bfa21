"""RQ's own bookkeeping, made to wait out Redis outages: the base of mlxq's worker.

SimpleWorker's steps (starting a job, ending it, its worker record, suspension
checks, maintenance, the pubsub thread for commands) each talk to Redis and would
crash the worker or lose a job's record in an outage. Here each one either waits
for Redis (`until_redis`: losing it would lose a job's state) or is skipped with
one log line per outage (`quietly`: it is repeated soon anyway).
"""

from __future__ import annotations

import time
from typing import Any

from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.utils import now
from rq.worker import WorkerStatus

from shared import keys
from shared.outage import REDIS, RETRY_MAX_S, UNREACHABLE, quietly, until_redis

RECORD_REFRESH_S = 5.0
"""How often RQ's record of the worker is refreshed between jobs (its TTL is RQ's worker_ttl + 60 s)."""

SUSPENSION_CHECK_S = 1.0
"""How often the worker looks whether it was suspended."""


class OutageTolerantWorker(SimpleWorker):
    """A SimpleWorker whose every Redis step survives an outage."""

    _record_due = 0.0
    _suspension_due = 0.0
    _started: set[str]
    """Jobs `start_execution` started, whose `prepare_job_execution` has nothing left to write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started = set()

    def start_execution(self, job: Job) -> Execution:
        """A claimed job's start, in one transaction: RQ's record of its execution (`prepare_execution`, a
        round trip of its own in RQ) and its start (`prepare_job_execution`, called by RQ's `perform_job`
        after, which then writes nothing). Not waited out here: the caller's `until_redis` does, and
        tells a retried start (an execution may have been recorded twice)."""
        with self.connection.pipeline() as pipe:
            heartbeat_ttl = self.get_heartbeat_ttl(job)
            execution = Execution.create(job, heartbeat_ttl, pipeline=pipe, worker_name=self.name)
            self.executions[execution.id] = execution
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self._job_start_writes(job, pipe, remove_from_intermediate_queue=len(self.queues) == 1)
            ours = len(pipe)
            self.starting(job, pipe)
            replies = pipe.execute()
        self._started.add(job.id)
        self.started(job, replies[ours:])
        return execution

    def starting(self, job: Job, pipe: Pipeline) -> None:
        """A subclass's own writes (and reads) at a job's start, in the start's transaction."""

    def started(self, job: Job, replies: list[Any]) -> None:
        """What Redis answered to `starting`'s commands, once the start is in."""

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ's start of a job (its worker record, the job's heartbeat and status, its queue's intermediate
        list), and the job's entry in the claimed list taken out in the same transaction: started now, it
        is no longer the claimed list's to put back. RQ's own method writes the rest alone, a round trip
        more on the way to every job's first token. Nothing for a job `start_execution` started."""
        if job.id in self._started:
            self._started.discard(job.id)
            return

        def prepare() -> None:
            with self.connection.pipeline() as pipe:
                self._job_start_writes(job, pipe, remove_from_intermediate_queue)
                pipe.execute()

        until_redis("starting a job", prepare)

    def _job_start_writes(self, job: Job, pipe: Pipeline, remove_from_intermediate_queue: bool) -> None:
        heartbeat_ttl = self.get_heartbeat_ttl(job)
        self.heartbeat(heartbeat_ttl, pipeline=pipe)
        job.heartbeat(now(), heartbeat_ttl, pipeline=pipe)
        job.prepare_for_execution(self.name, pipeline=pipe)
        pipe.persist(job.key)
        if remove_from_intermediate_queue:
            pipe.lrem(Queue(job.origin, connection=self.connection).intermediate_queue_key, 1, job.id)
        pipe.lrem(keys.worker_claimed(self.name), 1, job.id)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # RQ refreshes the job's heartbeat here too, for the success or failure callback it runs next:
        # mlxq's jobs have none, and their end is recorded at once after (a round trip for nothing).
        job.ended_at = now()

    def success_writes(self, job: Job, execution: Execution, pipe: Pipeline) -> None:
        """RQ's record of a finished job (its status and result, its registries, the worker's counts) on
        `pipe`, a transaction the caller executes with its own writes. RQ's `handle_job_success` reads
        the job's dependents first and writes apart from the caller's: two round trips more between the
        answer and its client, for what mlxq's jobs never have (gateway/jobs/records.py enqueues none
        with RQ's dependencies, repeats or rate limits: a batch does without them,
        shared/batch_progress.py)."""
        assert job.started_at is not None and job.ended_at is not None
        self.increment_successful_job_count(pipeline=pipe)
        self.increment_total_working_time(job.ended_at - job.started_at, pipe)
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        if result_ttl != 0:
            job._handle_success(
                result_ttl,
                pipeline=pipe,
                worker_name=self.name,
                execution_id=execution.id,
                execution_started_at=execution.created_at,
                execution_ended_at=job.ended_at,
            )
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        job._status = JobStatus.FINISHED
        self.cleanup_execution(job, pipeline=pipe, execution=execution)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # RQ's worker record; ours (the heartbeat key) is what supervision reads. RQ refreshes it
        # around every claim, three round trips each; its TTL is minutes, so once in a while will do.
        if timeout is None and pipeline is None and time.monotonic() < self._record_due:
            return
        beat = super().heartbeat
        quietly("refreshing RQ's worker record", lambda: beat(timeout, pipeline))
        self._record_due = time.monotonic() + RECORD_REFRESH_S

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        # RQ's own logs an error every 2 s of an outage; the thread goes on either way.
        if not isinstance(exc, UNREACHABLE):
            raise exc
        REDIS.failed("listening for RQ commands", exc)
        time.sleep(RETRY_MAX_S)

    def check_for_suspension(self, burst: bool) -> None:
        # RQ asks before every claim; `rq suspend` is an operator's command, heeded within a second.
        if time.monotonic() < self._suspension_due:
            return
        check = super().check_for_suspension
        quietly("checking for suspension", lambda: check(burst))
        self._suspension_due = time.monotonic() + SUSPENSION_CHECK_S

    def run_maintenance_tasks(self) -> None:
        quietly("RQ maintenance", super().run_maintenance_tasks)
