"""`/v1/models`: what may be requested here, and what the workers hold."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status

from gateway.deps import AdminDep, ModelsDep, RedisDep
from gateway.models import catalog, management

router = APIRouter(tags=["models"])


@router.get("/v1/models")
def list_models(models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """The configured models in OpenAI's list format, with their size and whether and where they are loaded."""
    return {"object": "list", "data": catalog.listing(models, redis)}


@router.get("/v1/models/{name}")
def retrieve_model(name: str, models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """One model in OpenAI's shape (the SDK's `models.retrieve`); 404 `model_not_found` if unknown."""
    return catalog.entry(models, redis, name)


@router.post("/v1/admin/models/{name:path}/unload", status_code=status.HTTP_202_ACCEPTED)
def unload_model(name: str, models: ModelsDep, redis: RedisDep, _admin: AdminDep) -> dict[str, Any]:
    """Ask every worker holding the model to unload it as soon as it is idle (needs an admin key when
    keys are set)."""
    return management.unload(redis, models, name)
