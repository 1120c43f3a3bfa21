"""Generation jobs as the gateway sees them: enqueue, inspect, cancel, all through RQ."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from shared import keys
from shared.errors import JobAlreadyEnded, JobNotFound
from shared.schemas import GenerateRequest, GenerationResult, JobStatus, JobView
from shared.settings import Settings

logger = logging.getLogger(__name__)

TASK = "worker.tasks.generate"

# RQ has more states than a client needs to tell apart.
_STATUS: dict[str, JobStatus] = {
    RQStatus.CREATED: "queued",
    RQStatus.QUEUED: "queued",
    RQStatus.DEFERRED: "queued",
    RQStatus.SCHEDULED: "queued",
    RQStatus.STARTED: "started",
    RQStatus.FINISHED: "finished",
    RQStatus.FAILED: "failed",
    RQStatus.STOPPED: "canceled",
    RQStatus.CANCELED: "canceled",
}


def build(request: GenerateRequest, queue: Queue, settings: Settings) -> Job:
    """An RQ job for the request, not yet saved: admission writes and enqueues it atomically.

    The request is stored as JSON; the description (shown by RQ and rq-dashboard) names
    only the model, never the prompt.
    """
    return queue.create_job(
        TASK,
        args=[request.model_dump(exclude_none=True)],
        timeout=settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.failure_ttl_s,
        description=f"generate model={request.model}",
        meta={"model": request.model},
    )


def fetch(job_id: str, redis: Redis) -> Job:
    try:
        return Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except (NoSuchJobError, ValueError):  # ValueError: not even a valid job id
        raise JobNotFound(f"No job with id '{job_id}' (it may have expired)", param="id") from None


def view(job: Job, queue: Queue) -> JobView:
    rq_status = job.get_status(refresh=False)
    error = job.meta.get("error")
    status = _STATUS.get(rq_status, "queued")
    if status == "failed" and error and error.get("code") == "canceled":
        status = "canceled"
    result = None
    if status == "finished":
        value = job.return_value(refresh=False)
        if value is not None:
            result = GenerationResult.model_validate(value)
    elif status == "failed" and not error:
        error = _error_from_traceback(job)
    return JobView(
        id=job.id,
        status=status,
        model=job.meta.get("model"),
        created_at=_aware(job.created_at),
        started_at=_aware(job.started_at),
        ended_at=_aware(job.ended_at),
        position=queue.get_job_position(job.id) if status == "queued" else None,
        result=result,
        error=error if status == "failed" else None,
    )


def cancel(job: Job, redis: Redis) -> None:
    """Cancel a queued job, or ask the worker running it to stop between tokens."""
    status = _STATUS.get(job.get_status(refresh=True), "queued")
    if status == "canceled":
        return
    if status in ("finished", "failed"):
        raise JobAlreadyEnded(f"Job '{job.id}' has already {status}; there is nothing to cancel", param="id")
    # The flag first: if a worker picks the job up between our read and cancel(), it still stops.
    redis.set(keys.job_cancel(job.id), 1, ex=keys.CANCEL_TTL_S)
    if status == "queued":
        try:
            job.cancel()
        except InvalidJobOperation:
            pass  # canceled by someone else in the meantime
        return
    try:
        send_stop_job_command(redis, job.id, serializer=JSONSerializer)
    except InvalidJobOperation:
        pass  # it ended in the meantime; the flag is harmless


def _error_from_traceback(job: Job) -> dict[str, Any]:
    """For failures our task did not describe (a crash in RQ itself): the exception's last line."""
    result = job.latest_result()
    text = (result.exc_string or "") if result else ""
    last = text.strip().splitlines()[-1] if text.strip() else "the job failed without an error message"
    return {"message": last, "type": "server_error", "code": "job_failed", "param": None}


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
