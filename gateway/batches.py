"""Fan-out batches with an optional synthesis step (Victoria's pattern).

The children are admitted together, one decision counting every child, into the
`low` queue. The synthesis job waits on all of them through RQ's own
dependencies (failures allowed), runs in the `normal` queue and sees every
child's text, or a marker for a child that failed. The batch record names the
jobs; everything else is read from RQ when the batch is looked at.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from rq.job import Dependency

from gateway import jobs, submission
from gateway.clients import Client
from gateway.deps import Gateway
from gateway.openai_api import ChatCompletionRequest
from shared import keys
from shared.errors import InvalidRequest, JobAlreadyEnded, JobNotFound
from shared.schemas import GenerateRequest


class BatchItem(ChatCompletionRequest):
    """One request of a batch, like a chat completion body; `model` defaults to the batch's."""

    model: str | None = None  # type: ignore[assignment]
    custom_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^{}]+$")] | None = None

    def for_batch(self, default_model: str) -> GenerateRequest:
        return self.model_copy(update={"model": self.model or default_model}).to_generate()


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    requests: Annotated[list[BatchItem], Field(min_length=1)]
    synthesis: BatchItem | None = Field(
        default=None, description="run after every child; `{{results}}` and `{{result:<custom_id>}}` are filled in"
    )


async def create(body: BatchRequest, request: Request, client: Client, gw: Gateway) -> dict[str, Any]:
    settings = gw.settings
    if len(body.requests) > settings.max_batch_requests:
        raise InvalidRequest(
            f"A batch has at most {settings.max_batch_requests} requests, not {len(body.requests)}", param="requests"
        )
    custom_ids = [item.custom_id or str(i) for i, item in enumerate(body.requests)]
    if len(set(custom_ids)) != len(custom_ids):
        raise InvalidRequest("custom_id values must be unique within a batch", param="requests")
    children = [item.for_batch(body.model) for item in body.requests]
    synthesis = body.synthesis.for_batch(body.model) if body.synthesis else None
    if synthesis is not None:
        gw.limits.check(synthesis)

    batch_id = "batch_" + uuid.uuid4().hex
    job_ids = [str(uuid.uuid4()) for _ in children]
    metas = [{"batch_id": batch_id, "custom_id": custom_id} for custom_id in custom_ids]
    idem = submission.idempotency(request, body.model_dump_json(), batch_id)
    done = await submission.admit(gw, client, children, "low", idem, metas, job_ids)
    redis: Redis = request.app.state.redis
    if done.duplicate:
        return view(redis, done.ids[0])

    record: dict[str, Any] = {
        "id": batch_id,
        "model": body.model,
        "created_at": done.created_at.isoformat() if done.created_at else None,
        "children": [{"job_id": j, "custom_id": c} for j, c in zip(job_ids, custom_ids, strict=True)],
        "synthesis_job_id": str(uuid.uuid4()) if synthesis else None,
    }
    redis.set(keys.batch(batch_id), json.dumps(record), ex=settings.result_ttl_s)
    if synthesis is not None:
        gw.queues["normal"].enqueue(
            "worker.tasks.synthesize",
            batch_id,
            synthesis.model_dump(exclude_none=True),
            job_id=record["synthesis_job_id"],
            depends_on=Dependency(jobs=job_ids, allow_failure=True),
            job_timeout=settings.job_timeout_s,
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.failure_ttl_s,
            description=f"synthesize batch={batch_id} model={synthesis.model}",
            meta={"model": synthesis.model, "batch_id": batch_id, "role": "synthesis"},
        )
    return view(redis, batch_id, headers=done.headers())


def _record(redis: Redis, batch_id: str) -> dict[str, Any]:
    raw = redis.get(keys.batch(batch_id))
    if raw is None:
        raise JobNotFound(f"No batch with id '{batch_id}' (it may have expired)", param="id")
    record: dict[str, Any] = json.loads(raw)
    return record


def view(redis: Redis, batch_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Counts by status, each child's status and result, and the synthesis."""
    record = _record(redis, batch_id)
    children = []
    for child in record["children"]:
        try:
            child_view = jobs.view(jobs.fetch(child["job_id"], redis), redis).model_dump(mode="json")
        except JobNotFound:
            child_view = {"id": child["job_id"], "status": "expired"}
        children.append({"custom_id": child["custom_id"], **child_view})
    synthesis = None
    if record.get("synthesis_job_id"):
        job = jobs.fetch(record["synthesis_job_id"], redis)
        synthesis = jobs.view(job, redis).model_dump(mode="json")
        synthesis["input_messages"] = job.meta.get("synthesis_input")
    counts = Counter(child["status"] for child in children)
    return {
        "id": batch_id,
        "object": "batch",
        "model": record["model"],
        "created_at": record.get("created_at"),
        "status": _overall(counts, synthesis),
        "counts": {"total": len(children), **counts},
        "requests": children,
        "synthesis": synthesis,
        "_headers": headers or {},
    }


def _overall(counts: Counter[str], synthesis: dict[str, Any] | None) -> str:
    pending = counts["queued"] + counts["started"]
    if synthesis is not None and synthesis["status"] in ("queued", "started"):
        return "in_progress"
    if pending:
        return "in_progress"
    if counts["canceled"]:
        return "canceled"
    return "completed"


def cancel(redis: Redis, batch_id: str, stream_ttl_s: int) -> dict[str, Any]:
    """Cancel every child and the synthesis that have not ended."""
    record = _record(redis, batch_id)
    ids = [child["job_id"] for child in record["children"]]
    if record.get("synthesis_job_id"):
        ids.append(record["synthesis_job_id"])
    for job_id in ids:
        try:
            jobs.cancel(jobs.fetch(job_id, redis), redis, stream_ttl_s)
        except (JobAlreadyEnded, JobNotFound):
            pass
    return view(redis, batch_id)
