"""Submit-and-poll: `/v1/jobs`."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from gateway import jobs
from gateway.deps import AdmissionDep, ClientDep, LimitsDep, QueueDep, RedisDep, SettingsDep
from shared.schemas import GenerateRequest, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobView)
async def submit_job(
    request: GenerateRequest,
    response: Response,
    client: ClientDep,
    limits: LimitsDep,
    admission: AdmissionDep,
    queue: QueueDep,
    settings: SettingsDep,
) -> JobView:
    """Queue a generation, or refuse it now with the reason and when to retry; poll `Location` for the result."""
    limits.check(request)
    job = jobs.build(request, queue, settings)
    rate = await admission.admit(client, [job])
    response.headers.update(rate.headers())
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobView(id=job.id, status="queued", model=request.model, created_at=job.created_at)


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
