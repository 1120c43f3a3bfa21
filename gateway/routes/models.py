"""`/v1/models`: what may be requested here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.deps import ModelsDep, RedisDep
from gateway.workers import live_workers

router = APIRouter(tags=["models"])


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
