"""Generation jobs as the gateway sees them: enqueue, inspect, cancel, all through RQ."""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import uuid4

from redis import Redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.utils import now, utcformat

from gateway.admission.clients import Client
from shared import batch_progress, keys, pulls, stats, task_names
from shared.embeddings import EmbedRequest
from shared.errors import GenerationCanceled, JobAlreadyEnded, JobNotFound
from shared.json_bytes import JobSerializer
from shared.schemas import GenerateRequest, GenerationResult, JobStatus, JobView
from shared.settings import Settings

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class JobRecord:
    """An RQ job hash ready for the admission script to write and enqueue."""

    id: str
    queue_key: str
    fields: list[bytes]
    created_at: datetime


@dataclass(frozen=True)
class DeferredJob:
    """A job written with the request but queued later by someone else (a batch's synthesis)."""

    id: str
    registry_key: str
    fields: list[bytes]


class JobFactory:
    """Builds RQ job hashes for generation requests, one template per queue.

    RQ builds one job at start-up and its `to_dict()` is the template: every field
    that is the same for all our jobs (callbacks, TTLs, timeout, status, origin) is
    RQ's own. Per request only the id, timestamps, call data, description and meta
    change, written as `Job.to_dict()` writes them (tests/test_job_factory.py holds
    the two equal), which spares an RQ Job object per request on the hot path.
    """

    _VARYING = ("created_at", "enqueued_at", "data", "description", "meta")

    def __init__(self, queue: Queue, settings: Settings) -> None:
        probe = queue.create_job(
            task_names.GENERATE,
            args=[{}],
            timeout=settings.job_timeout_s,
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.failure_ttl_s,
            description="",
            meta={},
        )
        probe.enqueued_at = now()
        self._static = [
            part
            for name, value in probe.to_dict().items()
            if name not in self._VARYING and value is not None
            for part in (name.encode(), _encoded(value))
        ]
        self._queue_key = queue.key
        self._priority = {settings.queue_interactive: "interactive", settings.queue_batch: "low"}.get(
            queue.name, "normal"
        )
        self._describe_prompts = settings.describe_prompts

    def build(
        self, request: GenerateRequest, job_id: str | None = None, meta: dict[str, Any] | None = None
    ) -> JobRecord:
        """The hash for one generation; its description names the model, never the prompt."""
        payload = request.model_dump(exclude_none=True)
        return self._record(task_names.GENERATE, payload, request.model, self.describe(request, meta), job_id, meta)

    def build_embedding(self, request: EmbedRequest, meta: dict[str, Any] | None = None) -> JobRecord:
        """The hash for one embedding or rerank job (all of a request's inputs: the worker batches them)."""
        description = f"{request.kind} model={request.model} inputs={len(request.inputs)} priority={self._priority}"
        payload = request.model_dump(exclude_none=True)
        # Its kind tells the claim script and the worker's affinity that it runs beside any generation
        # (worker/engine.py): taking it is no swap of the worker's model.
        return self._record(
            task_names.EMBED, payload, request.model, description, None, {"kind": request.kind, **(meta or {})}
        )

    def _record(
        self,
        func: str,
        payload: dict[str, Any],
        model: str,
        description: str,
        job_id: str | None,
        meta: dict[str, Any] | None,
    ) -> JobRecord:
        job_id = job_id or str(uuid4())
        moment = now()
        stamp = utcformat(moment).encode()
        call: list[Any] = [func, None, [payload], {}]
        varying = [
            b"created_at", stamp,
            b"enqueued_at", stamp,
            b"data", zlib.compress(json.dumps(call).encode()),
            b"description", description.encode(),
            b"meta", json.dumps({"model": model, **(meta or {})}).encode(),
        ]  # fmt: skip
        return JobRecord(job_id, self._queue_key, varying + self._static, moment)

    def describe(self, request: GenerateRequest, meta: dict[str, Any] | None = None) -> str:
        """What RQ and rq-dashboard show for the job: model and priority, a batch child's batch and
        custom_id; the prompt's first words only when `MLXQ_DESCRIBE_PROMPTS` allows."""
        description = f"generate model={request.model} priority={self._priority}"
        if meta and meta.get("batch_id"):
            description += f" batch={meta['batch_id']} custom_id={str(meta.get('custom_id', ''))[:64]}"
        if self._describe_prompts:
            text = request.prompt if request.prompt is not None else (request.messages or [])[-1].text()
            words = text.split()
            description += f' prompt="{" ".join(words[:8])}{" …" if len(words) > 8 else ""}"'
        return description


def deferred_job(
    queue: Queue,
    func: str,
    args: list[Any],
    *,
    job_id: str,
    settings: Settings,
    description: str,
    meta: dict[str, Any],
) -> DeferredJob:
    """An RQ job hash in the deferred state, for the admission script to write; queued later by
    whoever records the last of what it waits for."""
    job = queue.create_job(
        func,
        args=args,
        job_id=job_id,
        timeout=settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.failure_ttl_s,
        description=description,
        meta=meta,
        status=RQStatus.DEFERRED,
    )
    fields = [
        part for name, value in job.to_dict().items() if value is not None for part in (name.encode(), _encoded(value))
    ]
    return DeferredJob(job.id, queue.deferred_job_registry.key, fields)


def _encoded(value: object) -> bytes:
    # A str subclass is encoded as it is: str(JobStatus.QUEUED) would be "JobStatus.QUEUED".
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else str(value)).encode()


def fetch(job_id: str, redis: Redis) -> Job:
    try:
        return Job.fetch(job_id, connection=redis, serializer=JobSerializer)
    except (NoSuchJobError, ValueError):  # ValueError: not even a valid job id
        raise JobNotFound(f"No job with id '{job_id}' (it may have expired)", param="id") from None


def finished_result(job_id: str, redis: Redis) -> dict[str, Any] | None:
    """The result of a job that finished, as its worker returned it; None for any other job."""
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JobSerializer)
    except (NoSuchJobError, ValueError):
        return None
    value = job.return_value(refresh=False)
    return value if isinstance(value, dict) else None


def fetch_for(client: Client, job_id: str, redis: Redis) -> Job:
    """The job, if `client` may see it; another client's job is answered like one that does not exist."""
    job = fetch(job_id, redis)
    if not client.sees(job.meta.get("owner")):
        raise JobNotFound(f"No job with id '{job_id}' (it may have expired)", param="id")
    return job


def view(job: Job, redis: Redis) -> JobView:
    rq_status = job.get_status(refresh=False)
    error = job.meta.get("error")
    status = _STATUS.get(rq_status, "queued")
    if status == "failed" and error and error.get("code") == "canceled":
        status = "canceled"
    result, vectors = None, None
    if status == "finished":
        value = job.return_value(refresh=False)
        if isinstance(value, dict) and job.func_name == task_names.EMBED:
            vectors = value
        elif value is not None:
            result = GenerationResult.model_validate(value)
    elif status == "failed" and not error:
        error = _error_from_traceback(job)
    return JobView(
        id=job.id,
        status=status,
        model=job.meta.get("model"),
        created_at=job.created_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        position=_position(job, redis) if status == "queued" else None,
        attempts=int(job.meta.get("crash_attempts", 0)),
        waiting_for=_waiting_for(job, redis) if status == "queued" else None,
        result=result,
        embedding=vectors,
        error=error if status == "failed" else None,
    )


def _waiting_for(job: Job, redis: Redis) -> dict[str, Any] | None:
    """The download a queued job's model still waits for (claim.lua leaves the job where it is)."""
    model = job.meta.get("model")
    if not isinstance(model, str) or not redis.sismember(keys.PULLING, model):
        return None
    record = pulls.read(redis, model)
    if record is None:
        return None
    return {"pull": {k: record.get(k) for k in ("state", "repo", "done_bytes", "total_bytes", "percent")}}


def _position(job: Job, redis: Redis) -> int | None:
    if not job.origin:
        return None
    return Queue(job.origin, connection=redis, serializer=JobSerializer).get_job_position(job.id)


def cancel(job: Job, redis: Redis, stream_ttl_s: int) -> None:
    """Cancel a queued job, or ask the worker running it to stop between tokens."""
    rq_status = job.get_status(refresh=True)
    status = _STATUS.get(rq_status, "queued")
    if status == "canceled":
        return
    if status in ("finished", "failed"):
        raise JobAlreadyEnded(f"Job '{job.id}' has already {status}; there is nothing to cancel", param="id")
    # The flag first: if a worker picks the job up between our read and cancel(), it still stops.
    redis.set(keys.job_cancel(job.id), 1, ex=keys.CANCEL_TTL_S)
    # Out of its queue list first: only when that removed it can no worker have it. Otherwise a
    # worker is claiming it this instant, sees the flag as it starts, and ends it itself.
    waiting = rq_status == RQStatus.DEFERRED or (
        status == "queued" and job.origin and redis.lrem(Queue(job.origin, connection=redis).key, 1, job.id) == 1
    )
    if waiting:
        try:
            job.cancel()
        except InvalidJobOperation:
            pass  # canceled by someone else in the meantime
        else:
            error = GenerationCanceled("The job was canceled before it started").to_dict()
            batch_progress.job_ended(redis, job, "canceled", stream_ttl_s, error=error)
            stats.count(redis, keys.STATS_JOBS, "canceled")
            logger.info("job canceled before it started", extra={"job_id": job.id, "queue": job.origin})
        return
    try:
        send_stop_job_command(redis, job.id, serializer=JobSerializer)
    except InvalidJobOperation:
        pass  # it ended in the meantime; the flag is harmless


def _error_from_traceback(job: Job) -> dict[str, Any]:
    """For failures our task did not describe (a crash in RQ itself): the exception's last line."""
    result = job.latest_result()
    text = (result.exc_string or "") if result else ""
    return {"message": _exception_line(text), "type": "server_error", "code": "job_failed", "param": None}


def _exception_line(traceback_text: str) -> str:
    """The line naming the exception: the first unindented one after the last frame (a traceback's
    last line can be a note, as pydantic's "For further information visit ..." is)."""
    lines = traceback_text.strip().splitlines()
    frames = [n for n, line in enumerate(lines) if line.startswith("  File ")]
    after = lines[frames[-1] + 1 :] if frames else lines
    named = [line for line in after if line and not line[0].isspace()]
    return named[0] if named else (lines[-1] if lines else "the job failed without an error message")
