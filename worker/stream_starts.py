"""A generation's stream at its start: marked started, and read back, in the start's own transaction.

A job run again after its worker died carries on from what its stream already holds
(shared/job_stream.py `resumed`). Its start (worker/rq_outages.py `start_execution`)
marks the stream started and reads it in the same transaction as RQ's record of the
start: a round trip less between a job's claim and its first token. What it read waits
here for the job's task (worker/tasks.py), which reads the stream itself when nothing
waits (a start made another way). An embedding's stream gets only its end.
"""

from __future__ import annotations

from typing import Any

from redis.client import Pipeline
from rq.job import Job

from shared import job_stream, task_names

GENERATING = frozenset({task_names.GENERATE, task_names.SYNTHESIZE})
"""The tasks whose jobs stream text (worker/tasks.py `_run`)."""


class StreamStarts:
    def __init__(self, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._read: dict[str, job_stream.Resumed] = {}
        """Job id -> what earlier attempts left in its stream, read at its start, until its task takes it."""

    def writes(self, job: Job, pipe: Pipeline) -> None:
        """The start's commands on `pipe`, the start's transaction (none for a job that streams no text)."""
        if job.func_name in GENERATING:
            job_stream.start_on(pipe, job.id, self.ttl_s)

    def answered(self, job: Job, replies: list[Any]) -> None:
        """What Redis answered to `writes`' commands."""
        if replies:
            self._read[job.id] = job_stream.resumed(replies[-1])

    def take(self, job_id: str) -> job_stream.Resumed | None:
        """What the job's start read of its stream, once (None: not read; its task reads it)."""
        return self._read.pop(job_id, None)
