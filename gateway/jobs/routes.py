"""Submit-and-poll: `/v1/jobs`, and a job's live events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import Header, Request, Response, status
from redis import Redis
from starlette.concurrency import run_in_threadpool

from gateway.admission import submission
from gateway.deps import ClientDep, GatewayDep, RedisDep, SettingsDep, StreamsDep
from gateway.error_shapes import openai_error, router_for
from gateway.http.json_answer import json_text
from gateway.http.streaming import StreamingResponse
from gateway.jobs import records
from gateway.streams.following import STREAM_ID, follow
from shared.schemas import GenerateRequest, JobView

router = router_for(openai_error, prefix="/v1/jobs", tags=["jobs"])


class JobRequest(GenerateRequest):
    """A generation to queue; `priority` may lower it below the route's default (`normal`)."""

    priority: Literal["normal", "low"] | None = None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobView, responses={202: {"model": JobView}})
async def submit_job(body: JobRequest, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    """Queue a generation, or refuse it now with the reason and when to retry; poll `Location` for the result.

    An `Idempotency-Key` header makes a retry of the same request return the same job."""
    priority = submission.allowed_priority(body.priority, "normal")
    generate = GenerateRequest.model_validate(body.model_dump(exclude={"priority"}, exclude_unset=True))
    idem = submission.idempotency(request, body.model_dump_json(), "")
    done = await submission.accept(gw, client, [generate], priority, idem)
    job_id = done.ids[0]
    view = JobView(id=job_id, status="queued", model=generate.model, created_at=done.created_at)
    if done.duplicate:
        view = await run_in_threadpool(_view, job_id, request.app.state.redis)
    # A response of our own: FastAPI would otherwise validate the model it was just handed again.
    return Response(
        view.model_dump_json(),
        status_code=status.HTTP_202_ACCEPTED,
        media_type="application/json",
        headers={**done.headers(), "Location": f"/v1/jobs/{job_id}"},
    )


def _view(job_id: str, redis: Redis) -> JobView:
    return records.view(records.fetch(job_id, redis), redis)


@router.get("/{job_id}", response_model=JobView)
def get_job(job_id: str, redis: RedisDep, client: ClientDep) -> JobView:
    """A job's status, its place in the queue while queued, and its result or error once ended."""
    return records.view(records.fetch_for(client, job_id, redis), redis)


@router.delete("/{job_id}", response_model=JobView)
def cancel_job(job_id: str, response: Response, redis: RedisDep, settings: SettingsDep, client: ClientDep) -> JobView:
    """Cancel a queued job, or stop a running one between tokens (202 until it has stopped)."""
    records.cancel(records.fetch_for(client, job_id, redis), redis, settings.stream_ttl_s)
    current = records.view(records.fetch(job_id, redis), redis)
    if current.status != "canceled":
        response.status_code = status.HTTP_202_ACCEPTED
    return current


@router.get("/{job_id}/events", response_class=StreamingResponse)
async def job_events(
    job_id: str,
    redis: RedisDep,
    streams: StreamsDep,
    client: ClientDep,
    last_event_id: Annotated[str | None, Header(pattern=STREAM_ID)] = None,
) -> StreamingResponse:
    """Server-sent events: the job's status changes and its text as it is generated, then how it ended.

    Send `Last-Event-ID` to resume after the last event received."""
    # On a thread: the event loop serves every other request meanwhile (redis is the sync client).
    snapshot = await run_in_threadpool(lambda: records.view(records.fetch_for(client, job_id, redis), redis))

    async def events() -> AsyncIterator[str]:
        if last_event_id is None:
            yield f"event: snapshot\ndata: {snapshot.model_dump_json()}\n\n"
        async for entry in follow(streams, job_id, after=last_event_id or "0-0", pings=True):
            if entry.kind == "ping":
                yield ": ping\n\n"
            else:
                yield f"id: {entry.id}\nevent: {entry.kind}\ndata: {json_text(entry.data)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
