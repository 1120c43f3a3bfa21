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

from gateway.admission.clients import Client
from gateway.admission.submission import admit_jobs
from gateway.deps import Gateway
from gateway.streams import waiting
from shared.embeddings import EmbedRequest

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

    def check() -> EmbedRequest:
        checked = gw.limits.check_embedding(body)
        gw.pull_missing(checked.model)
        return checked

    checked = await run_in_threadpool(check)  # tokenizing inputs takes a while: off the event loop, one hop
    job = gw.jobs["interactive"].build_embedding(
        checked, meta={"owner": client.tag, "accepted_at": time.time(), "quiet": True}
    )
    decided = await admit_jobs(gw, client, [job], [checked.model], "single", "interactive", job.id)
    result = await waiting.result(request, job.id)
    headers = {**(decided.rate.headers() if decided.rate else {}), "x-mlxq-job-id": job.id}
    return Embedded(checked, result, headers, time.monotonic() - started)
