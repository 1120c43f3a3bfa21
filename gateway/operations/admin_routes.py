"""`/v1/admin/*`: models added, changed, pulled and loaded while the service runs, and what an
operator watches (`mlxq ps`, `mlxq jobs`, `mlxq top`). Admin key needed when keys are set."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from rq.job import Job

from gateway.deps import AdminDep, GatewayDep, ModelsDep, RedisDep, SettingsDep
from gateway.http.streaming import StreamingResponse
from gateway.models import management
from gateway.operations.workers import live_workers
from shared import pulls, stats
from shared.errors import ModelNotFound
from shared.json_bytes import JobSerializer
from shared.keys import STATS_COUNTERS
from shared.models import NAME, ModelRegistry

router = APIRouter(tags=["admin"])

ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=NAME.pattern)]


class Entry(BaseModel):
    """A model's entry, as in the models file (shared/models.py says what each field does)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    repo: str | None = None
    notes: str | None = None
    context_tokens: int | None = None
    max_prompt_chars: int | None = None
    keep_alive_s: int | None = None
    reasoning: list[str] | bool | None = None
    chat_template_kwargs: dict[str, bool | int | str] | None = None
    aliases: list[ModelName] | None = None
    defaults: dict[str, float | int] | None = None
    pin: bool | None = None
    warm: bool | None = None

    def fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True, exclude_none=True)


class PullBody(Entry):
    repo: Annotated[str, Field(min_length=3, max_length=200)]
    name: ModelName | None = None
    """The model's name here (the repo id by default)."""
    stream: bool = False
    """Progress as NDJSON lines until the pull ends (what `mlxq pull` shows)."""


@router.post("/v1/admin/models/pull", status_code=status.HTTP_202_ACCEPTED)
async def pull_model(
    body: PullBody, models: ModelsDep, redis: RedisDep, settings: SettingsDep, _admin: AdminDep
) -> Response:
    """Download a hub repo as a model (its fit checked first); jobs for it wait until it is here."""
    fields = body.fields()
    for key in ("repo", "name", "stream"):
        fields.pop(key, None)
    record = await run_in_threadpool(management.pull, redis, settings, models, body.repo, body.name, fields)
    if body.stream:
        return StreamingResponse(progress_lines(redis, models, record["name"]), media_type="application/x-ndjson")
    return JSONResponse(record, status_code=200 if record["state"] == "done" else 202)


async def progress_lines(redis: Any, models: ModelRegistry, name: str) -> AsyncIterator[str]:
    """The pull's record each time it moves, one JSON line, until it is done or failed (and then
    the model answers here at once)."""
    last: dict[str, Any] | None = None
    while True:
        record = await run_in_threadpool(pulls.read, redis, name)
        if record is None:  # removed meanwhile, or registered at once (files here)
            await run_in_threadpool(models.catch_up)
            yield json.dumps(last or {"name": name, "state": "done"}) + "\n"
            return
        if record != last:
            yield json.dumps(record) + "\n"
            last = record
        if record["state"] not in pulls.PENDING:
            await run_in_threadpool(models.catch_up)
            return
        await asyncio.sleep(0.5)


@router.get("/v1/admin/pulls")
def list_pulls(redis: RedisDep, _admin: AdminDep) -> dict[str, Any]:
    return {"pulls": pulls.every(redis)}


@router.get("/v1/admin/pulls/{name:path}")
def get_pull(name: str, redis: RedisDep, _admin: AdminDep) -> dict[str, Any]:
    record = pulls.read(redis, name)
    if record is None:
        raise ModelNotFound(f"No pull of model '{name}' is known here", param="name")
    return record


@router.put("/v1/admin/models/{name:path}")
def put_model(
    name: str, body: Entry, models: ModelsDep, redis: RedisDep, settings: SettingsDep, _admin: AdminDep
) -> dict[str, Any]:
    """Add a model (or replace the entry the API gave it): every gateway and worker sees it within a second."""
    return {"model": name, "entry": management.put(redis, settings, models, name, body.fields(), merge=False)}


@router.patch("/v1/admin/models/{name:path}")
def patch_model(
    name: str, body: Entry, models: ModelsDep, redis: RedisDep, settings: SettingsDep, _admin: AdminDep
) -> dict[str, Any]:
    """Change some fields of a model's entry (pin, warm, defaults...); a models file's model too."""
    spec = models.get(name)
    entry = management.put(redis, settings, models, spec.name, body.fields(), merge=True)
    return {"model": spec.name, "entry": entry}


@router.delete("/v1/admin/models/{name:path}")
def delete_model(name: str, models: ModelsDep, redis: RedisDep, settings: SettingsDep, _admin: AdminDep) -> Any:
    """Remove a model the API added (and the files its pull fetched); running jobs finish first."""
    return management.remove(redis, settings, models, name)


@router.post("/v1/admin/models/{name:path}/load", status_code=status.HTTP_202_ACCEPTED)
def load_model(name: str, models: ModelsDep, redis: RedisDep, _admin: AdminDep) -> dict[str, Any]:
    """Load the model now on every live worker (once its batch is done), before a request needs it."""
    return management.load(redis, models, name)


@router.get("/v1/admin/status")
def service_status(redis: RedisDep, gw: GatewayDep, settings: SettingsDep, _admin: AdminDep) -> dict[str, Any]:
    """One look at the service for `mlxq top`: queues, workers and their batches, memory, tokens."""
    workers = []
    for worker in live_workers(redis):
        workers.append(
            {
                key: worker.get(key)
                for key in (
                    "name",
                    "state",
                    "engine_state",
                    "batch_limit",
                    "models",
                    "memory",
                    "model_budget_bytes",
                    "model_held_bytes",
                    "kv_cache_bytes",
                    "prefix_cache_bytes",
                    "prefix_disk_bytes",
                    "prefix_disk_writing",
                    "prefix_disk_queued",
                    "prefix_hits",
                    "tokens_generated",
                    "at",
                )
            }
            | {"rows": len(worker.get("jobs") or [])}
        )
    totals = stats.counters(redis, STATS_COUNTERS)
    return {
        "at": time.time(),
        "queues": {priority: queue.count for priority, queue in gw.queues.items()},
        "pulls": [p for p in pulls.every(redis) if p["state"] in pulls.PENDING],
        "workers": workers,
        "thresholds": {
            "warning_percent": settings.memory_warning_percent,
            "critical_percent": settings.memory_critical_percent,
            "emergency_percent": settings.memory_emergency_percent,
        },
        "tokens_generated": totals.get("tokens_generated", 0.0),
        "prompt_tokens": {
            "cached": totals.get("prompt_tokens_cached", 0.0),
            "computed": totals.get("prompt_tokens_computed", 0.0),
        },
    }


@router.get("/v1/admin/jobs")
def list_jobs(redis: RedisDep, gw: GatewayDep, _admin: AdminDep, limit: int = 200) -> dict[str, Any]:
    """Jobs queued (by queue, oldest first) and running (by worker), each with its owner and model."""
    limit = max(1, min(limit, 1000))
    queued: list[tuple[str, str]] = []
    for priority, queue in gw.queues.items():
        queued += [(priority, job_id) for job_id in queue.get_job_ids(0, limit - 1)]
    running = [(w["name"], job_id) for w in live_workers(redis) for job_id in (w.get("jobs") or [])]
    ids = [job_id for _, job_id in queued + running]
    # With the serializer the jobs were written with: RQ's default (pickle) reads their meta as unreadable, and
    # every owner and model was listed as None.
    fetched = Job.fetch_many(ids, connection=redis, serializer=JobSerializer) if ids else []
    found = {job.id: job for job in fetched if job is not None}

    def row(job_id: str, state: str, place: dict[str, str]) -> dict[str, Any]:
        job = found.get(job_id)
        meta = job.meta if job is not None else {}
        created = job.created_at.timestamp() if job is not None and job.created_at else None
        return {
            "id": job_id,
            "state": state,
            **place,
            "owner": meta.get("owner"),
            "model": meta.get("model"),
            "created_at": created,
        }

    rows = [row(job_id, "queued", {"queue": priority}) for priority, job_id in queued]
    rows += [row(job_id, "running", {"worker": worker}) for worker, job_id in running]
    owners: dict[str, dict[str, int]] = {}
    for entry in rows:
        counts = owners.setdefault(str(entry["owner"]), {"queued": 0, "running": 0})
        counts[entry["state"]] += 1
    return {"jobs": rows[: limit * 2], "by_owner": owners}
