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

from rq import Queue, SimpleWorker
from rq.job import Job

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

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        prepare = super().prepare_job_execution
        until_redis("starting a job", lambda: prepare(job, remove_from_intermediate_queue))
        # Started now (RQ's registry has it): no longer the claimed list's to put back.
        until_redis("starting a job", lambda: self.connection.lrem(keys.worker_claimed(self.name), 1, job.id))

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        until_redis(
            "ending a job", lambda: super(OutageTolerantWorker, self).handle_execution_ended(job, queue, heartbeat_ttl)
        )

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
