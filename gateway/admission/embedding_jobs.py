"""An embedding or rerank request as one queued job, admitted by the rules generation follows.

Every protocol's route (OpenAI's /v1/embeddings, Ollama's /api/embed and
/api/embeddings, /v1/rerank) shapes its request into an `EmbedRequest` and its
answer from the job's result; this is the part they share: the checks (an
embedding model, inputs within their limits), admission (one job counts against
the queue and the client's in-flight cap like a generation) and the wait for the
result. The worker runs a request's inputs in batches (worker/embedding.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from gateway.admission.admit import Tier
from gateway.admission.clients import Client
from gateway.deps import Gateway
from gateway.streams import waiting
from shared.embeddings import EmbedRequest
from shared.errors import MlxqError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    request: EmbedRequest
    """As checked: the model's own name."""
    result: dict[str, Any]
    headers: dict[str, str]
    took_s: float


async def run(gw: Gateway, request: Request, client: Client, body: EmbedRequest) -> Embedded:
    """Check, admit and wait for one embedding or rerank job; raises what a generation's call raises."""
    started = time.monotonic()
    checked = await run_in_threadpool(gw.limits.check_embedding, body)
    await run_in_threadpool(gw.pull_missing, checked.model)
    tier: Tier = "single"
    gw.admission.check_size(1, tier)
    held = gw.refusals.check(client.id, tier, 1)
    if held is not None:
        raise held
    job = gw.jobs["interactive"].build_embedding(
        checked, meta={"owner": client.tag, "accepted_at": time.time(), "quiet": True}
    )
    try:
        decided = await gw.admission.admit(client, [job], tier, job.id, None, None)
    except MlxqError as refusal:
        gw.refusals.remember(client.id, refusal, tier, 1)
        raise
    logger.info("job admitted", extra={"job_id": job.id, "model": checked.model, "priority": "interactive"})
    result = await waiting.result(request, job.id)
    headers = {**(decided.rate.headers() if decided.rate else {}), "x-mlxq-job-id": job.id}
    return Embedded(checked, result, headers, time.monotonic() - started)
