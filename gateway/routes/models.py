"""`/v1/models`: what may be requested here, and what the workers hold."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, status

from gateway.deps import AdminDep, ModelsDep, RedisDep
from gateway.workers import live_workers
from shared import keys, sizing

router = APIRouter(tags=["models"])


@router.get("/v1/models")
def list_models(models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """The configured models in OpenAI's list format, with their size and whether and where they are loaded."""
    held: dict[str, list[dict[str, Any]]] = {}
    for worker in live_workers(redis):
        for model in worker.get("models", []):
            held.setdefault(model["name"], []).append({**model, "worker": worker["name"]})
    data = []
    for spec in models.all():
        copies = [m for m in held.get(spec.name, []) if m.get("state") == "loaded"]
        directory = spec.local_files()
        size = copies[0]["size_bytes"] if copies else (sizing.estimate(directory).weights_bytes if directory else None)
        data.append(
            {
                "id": spec.name,
                "object": "model",
                "created": 0,
                "owned_by": "mlxq",
                "source": spec.source,
                "notes": spec.notes,
                "size_bytes": size,
                "loaded": bool(copies),
                "last_used": max((m["last_used"] for m in copies), default=None),
                "active_requests": sum(m["active_requests"] for m in copies),
                "workers": [m["worker"] for m in copies],
                "problem": spec.problem(),
            }
        )
    return {"object": "list", "data": data}


@router.get("/v1/models/{name}")
def retrieve_model(name: str, models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """One model in OpenAI's shape (the SDK's `models.retrieve`); 404 `model_not_found` if unknown."""
    models.get(name)  # raises ModelNotFound, naming the models there are
    found: dict[str, Any] = next(m for m in list_models(models, redis)["data"] if m["id"] == name)
    return found


@router.post("/v1/admin/models/{name}/unload", status_code=status.HTTP_202_ACCEPTED)
def unload_model(name: str, models: ModelsDep, redis: RedisDep, _admin: AdminDep) -> dict[str, Any]:
    """Ask every worker holding the model to unload it as soon as it is idle (needs an admin key when
    keys are set)."""
    models.get(name)
    asked = [w["name"] for w in live_workers(redis) if any(m["name"] == name for m in w.get("models", []))]
    command = json.dumps({"command": "unload", "model": name})
    with redis.pipeline(transaction=False) as pipe:
        for worker in asked:
            pipe.rpush(keys.worker_commands(worker), command)
            pipe.expire(keys.worker_commands(worker), keys.WORKER_COMMANDS_TTL_S)
        pipe.execute()
    return {"model": name, "workers": asked}
