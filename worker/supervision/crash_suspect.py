"""A job suspected of killing a worker runs alone until it has shown it does not.

A job that was running when a worker died (its `crash_attempts` above 0) is a
suspect. Once claimed it holds further claims back until it has generated
SUSPECT_CLEARED_AFTER tokens here, and while it runs alone Redis names it
(keys.worker_suspect): if it kills this worker too, the watchdog counts the death
for it alone (worker/supervision/orphans.py), never for the jobs beside it. Past that it is
batched as any other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from redis import Redis
from rq import Queue
from rq.job import Job

from shared import keys
from shared.outage import quietly, until_redis

logger = logging.getLogger(__name__)

SUSPECT_CLEARED_AFTER = 16
"""Tokens a crash suspect generates here (past where its stream was when the worker died: it carries
on from there) before it counts as not the cause, and other jobs are claimed beside it again."""


class CrashSuspect:
    """This worker's one crash suspect, if any (RQ's main thread and the job threads alike)."""

    def __init__(self, connection: Redis, worker_name: str, generated: Callable[[str], int]) -> None:
        """`generated(job_id)` is how many tokens the engine made for a job so far in this process."""
        self._connection = connection
        self._key = keys.worker_suspect(worker_name)
        self._generated = generated
        self._lock = threading.Lock()
        self._job_id: str | None = None

    @property
    def present(self) -> bool:
        return self._job_id is not None

    def claimed(self, claimed: tuple[Job, Queue], alone: bool) -> tuple[Job, Queue]:
        """A claimed job, made the suspect when it is one; named in Redis before it starts when it
        will run `alone` (beside others, a death might be theirs, and all count)."""
        job = claimed[0]
        if int(job.meta.get("crash_attempts", 0)) == 0:
            return claimed
        with self._lock:
            self._job_id = job.id
        if alone:
            until_redis("naming a crash suspect", lambda: self._connection.set(self._key, job.id))
        return claimed

    def holds_claims(self) -> bool:
        """Whether a suspect still holds the claims back; one that got far enough is cleared."""
        suspect = self._job_id
        if suspect is None:
            return False
        if self._generated(suspect) < SUSPECT_CLEARED_AFTER:
            return True
        logger.info("a crash suspect generated past its test; batching again", extra={"job_id": suspect})
        self.clear(suspect)
        return False

    def clear(self, job_id: str) -> None:
        """`job_id` ended or passed its test: it is no longer the suspect (if it still was)."""
        with self._lock:
            if self._job_id != job_id:
                return  # cleared already, and maybe another named since
            self._job_id = None
            quietly("clearing a crash suspect", lambda: self._connection.delete(self._key))
