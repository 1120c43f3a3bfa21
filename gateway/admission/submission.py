"""The one way work gets in: `accept` checks a request's shape and limits (resolving its
`max_tokens`), repeats a remembered refusal, or has the admission script admit and enqueue it.

Every submitting route (jobs, every protocol's calls, batches) goes through `accept`, so
the same checks, counters and Idempotency-Key rules apply to all of them.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from gateway.admission.admit import Admitted, BatchWrite, Idempotency, RateState, Tier
from gateway.admission.clients import Client
from gateway.admission.prompt_limits import Fitted
from gateway.deps import Gateway
from gateway.http.received import RECEIVED_AT
from gateway.jobs.records import JobRecord
from shared.errors import InvalidRequest, MlxqError
from shared.schemas import GenerateRequest

logger = logging.getLogger(__name__)

Priority = Literal["interactive", "normal", "low"]
RANK: dict[str, int] = {"interactive": 0, "normal": 1, "low": 2}

_KEY = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")


@dataclass(frozen=True)
class Accepted:
    ids: list[str]
    """The new jobs' ids, or the one id remembered for a repeated Idempotency-Key."""
    created_at: datetime | None
    rate: RateState | None
    fitted: list[Fitted]
    """Each request as checked: `max_tokens` resolved, the prompt counted."""
    duplicate: bool = False

    def headers(self) -> dict[str, str]:
        """The rate headers, and for one request the most tokens it may generate here."""
        limit = {"x-mlxq-max-tokens": str(self.fitted[0].max_tokens)} if len(self.fitted) == 1 else {}
        return {**(self.rate.headers() if self.rate else {}), **limit}


def allowed_priority(asked: str | None, route_default: Priority) -> Priority:
    """The priority asked for, if it is not above what the route allows."""
    if asked is None:
        return route_default
    if asked not in RANK:
        raise InvalidRequest(f"priority must be one of {sorted(RANK, key=RANK.__getitem__)}", param="priority")
    if RANK[asked] < RANK[route_default]:
        raise InvalidRequest(
            f"priority '{asked}' is higher than this route allows ('{route_default}' at most)", param="priority"
        )
    return asked  # type: ignore[return-value]


def idempotency(request: Request, body: str, remember_id: str) -> Idempotency | None:
    """The request's Idempotency-Key, if it sent one, bound to the route and the exact request."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _KEY.match(key):
        raise InvalidRequest("Idempotency-Key must be 1-255 letters, digits or _.:-", param="Idempotency-Key")
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n{body}".encode()).hexdigest()
    return Idempotency(key=key, request_hash=digest, remember_id=remember_id)


async def accept(
    gw: Gateway,
    client: Client,
    requests: list[GenerateRequest],
    priority: Priority,
    idem: Idempotency | None = None,
    metas: list[dict[str, Any]] | None = None,
    job_ids: list[str] | None = None,
    batch: BatchWrite | None = None,
    streamed: bool = True,
) -> Accepted:
    """Check, then admit and enqueue every request as a job in the priority's queue, or none of them.

    Low-priority work (batch children included) is the batch tier: its own per-client cap,
    and served in turns by client rather than first come first served. A call that waits for
    its whole answer (`streamed=False`) makes quiet jobs: their streams get only their ends
    (worker/tasks.py), since each token written there costs the engine CPU and nobody reads it."""
    accepted_at = time.time()  # where the job's hops begin (Timings.hops_ms)
    received_at = RECEIVED_AT.get()

    def checked() -> list[Fitted]:
        fitted = [gw.limits.check(request) for request in requests]
        # A hub model not here yet starts its pull before its jobs exist, so that none is claimed before
        # claim.lua knows to leave it waiting.
        for model in sorted({fit.request.model for fit in fitted}):
            gw.pull_missing(model)
        return fitted

    # Rendering a long prompt's chat template takes a while: off the event loop, in one hop to a thread
    # (each hop is a wait for the GIL beside everything else this gateway does). A short one is quicker here.
    chars = sum(request.prompt_chars() for request in requests)
    quick = not any(request.tools for request in requests) and gw.limits.quick([r.model for r in requests], chars)
    fitted = checked() if quick else await run_in_threadpool(checked)
    requests = [fit.request for fit in fitted]
    tier: Tier = "batch" if priority == "low" else "single"
    factory = gw.jobs[priority]
    jobs: list[JobRecord] = [
        factory.build(
            request,
            job_id=(job_ids[i] if job_ids else None),
            meta={
                **(metas[i] if metas else {}),
                "owner": client.tag,
                "accepted_at": accepted_at,
                **({"received_at": received_at} if received_at is not None else {}),
                **({} if streamed else {"quiet": True}),
                **({"prefix": list(fitted[i].routes)} if fitted[i].routes else {}),
            },
        )
        for i, request in enumerate(requests)
    ]
    if idem is not None and len(jobs) == 1 and not idem.remember_id:
        idem = Idempotency(idem.key, idem.request_hash, jobs[0].id)
    request_id = batch.batch_id if batch else jobs[0].id
    models = [request.model for request in requests]
    decided = await admit_jobs(gw, client, jobs, models, tier, priority, request_id, idem, batch)
    if decided.duplicate_of is not None:
        return Accepted(ids=[decided.duplicate_of], created_at=None, rate=None, fitted=fitted, duplicate=True)
    return Accepted(ids=[job.id for job in jobs], created_at=jobs[0].created_at, rate=decided.rate, fitted=fitted)


async def admit_jobs(
    gw: Gateway,
    client: Client,
    jobs: list[JobRecord],
    models: list[str],
    tier: Tier,
    priority: Priority,
    request_id: str,
    idem: Idempotency | None = None,
    batch: BatchWrite | None = None,
) -> Admitted:
    """Admit `jobs` (for `models`, one each) as one request, or refuse them all: the tier's size limits, a
    refusal this client was given a moment ago, then admission's script. Each job admitted is logged."""
    gw.admission.check_size(len(jobs), tier)
    held = gw.refusals.check(client.id, tier, len(jobs))
    if held is not None:
        raise held
    try:
        decided = await gw.admission.admit(client, jobs, tier, request_id, idem, batch)
    except MlxqError as refusal:
        gw.refusals.remember(client.id, refusal, tier, len(jobs))
        raise
    if decided.duplicate_of is None:
        for job, model in zip(jobs, models, strict=True):
            logger.info("job admitted", extra={"job_id": job.id, "model": model, "priority": priority})
    return decided
