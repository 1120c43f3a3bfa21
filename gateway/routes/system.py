"""Health and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.deps import ModelsDep, QueueDep, RedisDep, SettingsDep
from gateway.workers import live_workers
from shared import memory

router = APIRouter(tags=["system"])


@router.get("/health")
def health(redis: RedisDep, queue: QueueDep, settings: SettingsDep) -> JSONResponse:
    """Memory status by the 85/95 % thresholds, live workers and queue depth; 503 when no worker is alive."""
    workers = live_workers(redis)
    reported = [w["memory"] for w in workers if isinstance(w.get("memory"), dict)]
    # The worst machine speaks for the service; with no worker, this machine's own reading.
    mem = max(reported, key=lambda m: float(m["used_percent"])) if reported else memory.snapshot(settings)
    status = memory.status_for(float(mem["used_percent"]), settings) if workers else "degraded"
    body: dict[str, Any] = {
        "status": status,
        "memory": mem,
        "workers": [
            {k: w.get(k) for k in ("name", "host", "pid", "state", "jobs", "models", "last_seen_s")}
            for w in workers
        ],
        "queues": {queue.name: queue.count},
    }
    return JSONResponse(body, status_code=200 if workers else 503)


@router.get("/v1/models")
def list_models(models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """The configured models in OpenAI's list format, with where each comes from and whether it is loaded."""
    loaded = {name for w in live_workers(redis) for name in w.get("models", [])}
    return {
        "object": "list",
        "data": [
            {
                "id": spec.name,
                "object": "model",
                "created": 0,
                "owned_by": "mlxq",
                "source": spec.source,
                "notes": spec.notes,
                "loaded": spec.name in loaded,
                "problem": spec.problem(),
            }
            for spec in models.all()
        ],
    }
