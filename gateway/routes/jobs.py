"""Submit-and-poll: `/v1/jobs`."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from gateway import jobs
from gateway.deps import ClientDep, GatewayDep, QueueDep, RedisDep
from shared.errors import MlxqError
from shared.schemas import GenerateRequest, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobView, responses={202: {"model": JobView}})
async def submit_job(request: GenerateRequest, client: ClientDep, gw: GatewayDep) -> Response:
    """Queue a generation, or refuse it now with the reason and when to retry; poll `Location` for the result."""
    gw.limits.check(request)
    held = gw.refusals.check(client.id)
    if held is not None:
        raise held
    job = gw.jobs.build(request)
    try:
        rate = await gw.admission.admit(client, [job])
    except MlxqError as refusal:
        gw.refusals.remember(client.id, refusal)
        raise
    view = JobView(id=job.id, status="queued", model=request.model, created_at=job.created_at)
    # A response of our own: FastAPI would otherwise validate the model it was just handed again.
    return Response(
        view.model_dump_json(),
        status_code=status.HTTP_202_ACCEPTED,
        media_type="application/json",
        headers={**rate.headers(), "Location": f"/v1/jobs/{job.id}"},
    )


@router.get("/{job_id}", response_model=JobView)
def get_job(job_id: str, redis: RedisDep, queue: QueueDep) -> JobView:
    """A job's status, its place in the queue while queued, and its result or error once ended."""
    return jobs.view(jobs.fetch(job_id, redis), queue)


@router.delete("/{job_id}", response_model=JobView)
def cancel_job(job_id: str, response: Response, redis: RedisDep, queue: QueueDep) -> JobView:
    """Cancel a queued job, or stop a running one between tokens (202 until it has stopped)."""
    job = jobs.fetch(job_id, redis)
    jobs.cancel(job, redis)
    current = jobs.view(jobs.fetch(job_id, redis), queue)
    if current.status != "canceled":
        response.status_code = status.HTTP_202_ACCEPTED
    return current
