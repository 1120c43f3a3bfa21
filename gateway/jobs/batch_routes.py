"""`/v1/batches`: fan-out batches with a synthesis step."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.deps import ClientDep, GatewayDep, RedisDep, SettingsDep, StreamsDep
from gateway.error_shapes import openai_error, router_for
from gateway.http.streaming import StreamingResponse
from gateway.jobs import batches
from gateway.streams.batch_following import follow_batch
from gateway.streams.following import STREAM_ID

router = router_for(openai_error, prefix="/v1/batches", tags=["batches"])


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def create_batch(body: batches.BatchRequest, request: Request, client: ClientDep, gw: GatewayDep) -> JSONResponse:
    """Queue every request of the batch (all or none) and, once they have all ended, the synthesis."""
    created = await batches.create(body, request, client, gw)
    headers = created.pop("_headers")
    return JSONResponse(
        created, status_code=status.HTTP_202_ACCEPTED, headers={**headers, "Location": f"/v1/batches/{created['id']}"}
    )


@router.get("/{batch_id}")
async def get_batch(batch_id: str, redis: RedisDep, client: ClientDep) -> dict[str, Any]:
    """Counts by status, each request's status and result, and the synthesis's."""
    found = await run_in_threadpool(batches.view, redis, batch_id, client)
    found.pop("_headers")
    return found


@router.delete("/{batch_id}")
async def cancel_batch(batch_id: str, redis: RedisDep, settings: SettingsDep, client: ClientDep) -> dict[str, Any]:
    """Cancel the requests and the synthesis that have not finished."""
    found = await run_in_threadpool(batches.cancel, redis, batch_id, client, settings.stream_ttl_s)
    found.pop("_headers")
    return found


@router.get("/{batch_id}/events", response_class=StreamingResponse)
async def batch_events(
    batch_id: str,
    redis: RedisDep,
    streams: StreamsDep,
    settings: SettingsDep,
    client: ClientDep,
    last_event_id: Annotated[str | None, Header(pattern=r"^(synthesis:)?" + STREAM_ID[1:])] = None,
) -> StreamingResponse:
    """Server-sent events: `child` as each request ends (custom_id, status, usage), `children_done`, the
    synthesis's `synthesis_text` as it is generated and `synthesis_end`, then `end`.

    Send `Last-Event-ID` to resume after the last event received."""
    record = await run_in_threadpool(batches.load_record, redis, batch_id, client)
    return StreamingResponse(
        follow_batch(redis, streams, record, last_event_id, settings.stream_ttl_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )
