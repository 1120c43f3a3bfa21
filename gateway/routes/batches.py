"""`/v1/batches`: fan-out batches with a synthesis step."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway import batches
from gateway.deps import ClientDep, GatewayDep, RedisDep, SettingsDep

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def create_batch(body: batches.BatchRequest, request: Request, client: ClientDep, gw: GatewayDep) -> JSONResponse:
    """Queue every request of the batch (all or none) and, once they have all ended, the synthesis."""
    created = await batches.create(body, request, client, gw)
    headers = created.pop("_headers")
    return JSONResponse(
        created, status_code=status.HTTP_202_ACCEPTED, headers={**headers, "Location": f"/v1/batches/{created['id']}"}
    )


@router.get("/{batch_id}")
async def get_batch(batch_id: str, redis: RedisDep) -> dict[str, Any]:
    """Counts by status, each request's status and result, and the synthesis's."""
    found = await run_in_threadpool(batches.view, redis, batch_id)
    found.pop("_headers")
    return found


@router.delete("/{batch_id}")
async def cancel_batch(batch_id: str, redis: RedisDep, settings: SettingsDep) -> dict[str, Any]:
    """Cancel the requests and the synthesis that have not finished."""
    found = await run_in_threadpool(batches.cancel, redis, batch_id, settings.stream_ttl_s)
    found.pop("_headers")
    return found
