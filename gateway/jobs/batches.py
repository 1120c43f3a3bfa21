"""Fan-out batches with an optional synthesis step (Victoria's pattern).

The children are admitted together, one decision counting every child as a
generation and the batch as one request, into the batch tier (the `low` queue,
served in turns by client). The batch record and the synthesis job (deferred)
are written in the same atomic step. The synthesis does not use RQ's
dependencies, which never release a job whose dependency was canceled: each
child's end is recorded (shared/batch_progress.py), and the last one queues the
synthesis in the `normal` queue, where it sees every child's text, or a marker
for a child that failed or was canceled. The batch record names the jobs;
everything else is read from RQ when the batch is looked at.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis import Redis
from rq.utils import now as rq_now
from starlette.concurrency import run_in_threadpool

from gateway.admission import submission
from gateway.admission.admit import BatchWrite
from gateway.admission.clients import Client
from gateway.deps import Gateway
from gateway.jobs import records
from gateway.openai.shapes import ChatCompletionRequest
from shared import keys, task_names
from shared.errors import BatchTooLarge, InvalidRequest, JobAlreadyEnded, JobNotFound
from shared.schemas import GenerateRequest


class BatchItem(ChatCompletionRequest):
    """One request of a batch, like a chat completion body; `model` defaults to the batch's."""

    model: str | None = None  # type: ignore[assignment]
    custom_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^{}]+$")] | None = None

    def for_batch(self, default_model: str) -> GenerateRequest:
        return self.model_copy(update={"model": self.model or default_model}).to_generate()


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _not_openais_file_batches(cls, data: Any) -> Any:
        if isinstance(data, dict) and "input_file_id" in data:
            raise ValueError(
                "`input_file_id` belongs to OpenAI's file-based Batch API, which mlxq does not offer: "
                'POST /v1/batches here is a fan-out, `{"model": ..., "requests": [chat completion bodies], '
                '"synthesis": ...}` (see the README\'s fan-out batches)'
            )
        return data

    model: Annotated[str, Field(min_length=1, max_length=256)]
    requests: Annotated[list[BatchItem], Field(min_length=1)]
    synthesis: BatchItem | None = Field(
        default=None, description="run after every child; `{{results}}` and `{{result:<custom_id>}}` are filled in"
    )


async def create(body: BatchRequest, request: Request, client: Client, gw: Gateway) -> dict[str, Any]:
    """Admit the children, the batch record and the deferred synthesis in one step, or none of them."""
    settings = gw.settings
    if len(body.requests) > settings.max_batch_requests:
        raise BatchTooLarge(
            f"This batch has {len(body.requests)} requests; MLXQ_MAX_BATCH_REQUESTS allows "
            f"{settings.max_batch_requests} per batch: split it into smaller batches",
            param="requests",
        )
    custom_ids = [item.custom_id or str(i) for i, item in enumerate(body.requests)]
    if len(set(custom_ids)) != len(custom_ids):
        raise InvalidRequest("custom_id values must be unique within a batch", param="requests")
    children = [item.for_batch(body.model) for item in body.requests]
    synthesis = body.synthesis.for_batch(body.model) if body.synthesis else None
    if synthesis is not None:
        # On a thread, as accept checks the children: its chat template is rendered, and a model
        # name not known yet is looked up in Redis.
        synthesis = (await run_in_threadpool(gw.limits.check, synthesis)).request

    batch_id = "batch_" + uuid.uuid4().hex
    job_ids = [str(uuid.uuid4()) for _ in children]
    metas = [{"batch_id": batch_id, "custom_id": custom_id} for custom_id in custom_ids]
    record: dict[str, Any] = {
        "id": batch_id,
        "model": body.model,
        "created_at": rq_now().isoformat(),
        "children": [{"job_id": j, "custom_id": c} for j, c in zip(job_ids, custom_ids, strict=True)],
        "synthesis_job_id": str(uuid.uuid4()) if synthesis else None,
        "synthesis_queue_key": gw.queues["normal"].key,
        "synthesis_registry_key": gw.queues["normal"].deferred_job_registry.key,
        "owner": client.tag,
    }
    deferred = None
    if synthesis is not None:
        deferred = records.deferred_job(
            gw.queues["normal"],
            task_names.SYNTHESIZE,
            [batch_id, synthesis.model_dump(exclude_none=True)],
            job_id=record["synthesis_job_id"],
            settings=settings,
            description=f"synthesize batch={batch_id} model={synthesis.model}",
            meta={"model": synthesis.model, "batch_id": batch_id, "role": "synthesis", "owner": client.tag},
        )
    write = BatchWrite(batch_id, json.dumps(record), deferred)
    idem = submission.idempotency(request, body.model_dump_json(), batch_id)
    done = await submission.accept(gw, client, children, "low", idem, metas, job_ids, batch=write)
    if done.duplicate:
        redis: Redis = request.app.state.redis
        return await run_in_threadpool(view, redis, done.ids[0], client)
    return {
        "id": batch_id,
        "object": "batch",
        "model": body.model,
        "created_at": record["created_at"],
        "status": "in_progress",
        "counts": {"total": len(children), "queued": len(children)},
        "requests": [{"custom_id": c, "id": j, "status": "queued"} for j, c in zip(job_ids, custom_ids, strict=True)],
        "synthesis": {"id": record["synthesis_job_id"], "status": "queued"} if synthesis else None,
        "_headers": done.headers(),
    }


def load_record(redis: Redis, batch_id: str, client: Client) -> dict[str, Any]:
    """The batch's record, if `client` may see it (another client's batch is answered as missing)."""
    raw = redis.get(keys.batch(batch_id))
    record: dict[str, Any] | None = json.loads(raw) if raw is not None else None
    if record is None or not client.sees(record.get("owner")):
        raise JobNotFound(f"No batch with id '{batch_id}' (it may have expired)", param="id")
    return record


def view(redis: Redis, batch_id: str, client: Client, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Counts by status, each child's status and result, and the synthesis."""
    record = load_record(redis, batch_id, client)
    children = []
    for child in record["children"]:
        try:
            child_view = records.view(records.fetch(child["job_id"], redis), redis).model_dump(mode="json")
        except JobNotFound:
            child_view = {"id": child["job_id"], "status": "expired"}
        children.append({"custom_id": child["custom_id"], **child_view})
    synthesis = None
    if record.get("synthesis_job_id"):
        job = records.fetch(record["synthesis_job_id"], redis)
        synthesis = records.view(job, redis).model_dump(mode="json")
        synthesis["input_messages"] = job.meta.get("synthesis_input")
        synthesis["truncation"] = job.meta.get("synthesis_truncation")
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


def cancel(redis: Redis, batch_id: str, client: Client, stream_ttl_s: int) -> dict[str, Any]:
    """Cancel every child and the synthesis that have not ended."""
    record = load_record(redis, batch_id, client)
    ids = [child["job_id"] for child in record["children"]]
    if record.get("synthesis_job_id"):
        # First, so that the children's ends below do not queue it.
        ids.insert(0, record["synthesis_job_id"])
    for job_id in ids:
        try:
            records.cancel(records.fetch(job_id, redis), redis, stream_ttl_s)
        except (JobAlreadyEnded, JobNotFound):
            pass
    return view(redis, batch_id, client)
