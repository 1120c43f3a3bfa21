"""The functions RQ runs, by import path (shared/task_names.py).

RQ calls a task with only the job's arguments, so the engine that owns this
process's MLX device is bound here once at start-up by `worker.main`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from functools import partial
from typing import Any

from pydantic import ValidationError
from rq import get_current_job
from rq.job import Job

from shared import job_stream
from shared.embeddings import EmbedRequest
from shared.errors import GenerationFailed, InvalidRequest, MlxqError
from shared.models import ModelRegistry
from shared.outage import until_redis
from shared.schemas import GenerateRequest, GenerationResult, PromptTokensDetails, Timings, ToolCall, Usage
from shared.settings import Settings
from shared.tokenizing import ModelTexts
from worker import embedding, synthesis
from worker.embedding import EmbedWork
from worker.engine import Engine
from worker.generation import MISSING_MAX_TOKENS, Generation, Submission
from worker.rows import Outcome
from worker.streaming import StreamPublisher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What tasks in this process run with."""

    engine: Engine
    models: ModelRegistry
    settings: Settings
    keep_alive: Callable[[Job], None]
    """Refreshes RQ's heartbeats for a job while RQ's main thread waits on the engine."""
    publisher: StreamPublisher
    resumed: Callable[[str], job_stream.Resumed | None] = lambda job_id: None
    """What the job's start read of its stream (worker/stream_starts.py), once; None: read it here."""
    texts: ModelTexts = field(default_factory=ModelTexts)
    """Tokenizers and context lengths, for sizing a batch's synthesis prompt."""


_runtime: Runtime | None = None

DEADLINE_MARGIN_S = 2.0
"""Our own deadline fires this long before RQ's SIGALRM, so the loop stops cleanly first."""


def bind(runtime: Runtime) -> None:
    """Give tasks in this process the engine to run on."""
    global _runtime
    _runtime = runtime


def generate(request: dict[str, Any]) -> dict[str, Any]:
    """Run one generation and return a `GenerationResult` as a dict."""
    job, runtime = _context()
    return _run(job, runtime, lambda: GenerateRequest.model_validate(request))


def synthesize(batch_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """A batch's synthesis: fill the placeholders with its children's texts, then generate."""
    job, runtime = _context()

    def prepare() -> GenerateRequest:
        spec = runtime.models.get(str(request.get("model")))
        max_tokens = request.get("max_tokens")
        if not isinstance(max_tokens, int):
            raise InvalidRequest(MISSING_MAX_TOKENS, param="max_tokens")
        filled = synthesis.fill(job.connection, batch_id, request, runtime.texts.get(spec), max_tokens)
        job.meta["synthesis_input"] = filled.request["messages"]
        job.meta["synthesis_truncation"] = filled.truncation
        job.save_meta()
        return GenerateRequest.model_validate(filled.request)

    return _run(job, runtime, prepare)


def embed(request: dict[str, Any]) -> dict[str, Any]:
    """Vectors for an embedding job's inputs (or a rerank's scores), in batches on the engine thread."""
    job, runtime = _context()
    logger.info("job started", extra={"job_id": job.id, "model": job.meta.get("model"), "queue": job.origin})
    with _errors_recorded(job):
        req = EmbedRequest.model_validate(request)
        work = EmbedWork(job.id, req, runtime.models.get(req.model))
        started = time.monotonic()
        runtime.engine.embed(work)
        try:
            while not work.wait(runtime.settings.heartbeat_interval_s):
                runtime.keep_alive(job)
        finally:
            work.cancel()  # whatever interrupted the wait, the engine lets go too
        if work.error is not None:
            raise work.error
    result: dict[str, Any] = {
        "model": req.model,
        "prompt_tokens": work.prompt_tokens,
        "truncated": work.truncated,
        "load_s": work.load_s,
        "took_s": time.monotonic() - started,
    }
    if work.judged:  # a reranker's own scores
        result["scores"] = [v[0] if v else 0.0 for v in work.vectors]
        return result
    vectors = [embedding.shaped(v or [], req.dimensions) for v in work.vectors]
    if req.kind == "rerank":
        result["scores"] = embedding.scores(vectors[0], vectors[1:])
    else:
        result["embeddings"] = vectors
    logger.info(
        "job finished",
        extra={"job_id": job.id, "model": req.model, "inputs": len(req.inputs), "prompt_tokens": work.prompt_tokens},
    )
    return result


def _context() -> tuple[Job, Runtime]:
    job = get_current_job()
    if job is None or _runtime is None:
        raise RuntimeError("mlxq tasks run only inside an mlxq worker")
    return job, _runtime


def _run(job: Job, runtime: Runtime, prepare: Callable[[], GenerateRequest]) -> dict[str, Any]:
    ttl_s = runtime.settings.stream_ttl_s
    redis = job.connection
    logger.info("job started", extra={"job_id": job.id, "model": job.meta.get("model"), "queue": job.origin})
    with _errors_recorded(job):
        # An attempt after a crash or a hand-back carries on from what the earlier ones streamed.
        resume = runtime.resumed(job.id) or until_redis(
            "starting a job's stream", lambda: job_stream.started(redis, job.id, ttl_s)
        )
        req = prepare()
        spec = runtime.models.get(req.model)
        timeout_s = float(job.timeout) if job.timeout and job.timeout > 0 else float("inf")
        submission = Submission(
            job_id=job.id,
            request=req,
            spec=spec,
            deadline=time.monotonic() + timeout_s - DEADLINE_MARGIN_S,
            on_text=(lambda sent: None) if job.meta.get("quiet") else partial(runtime.publisher.piece, job.id),
            resume=resume,
        )
        submitted = time.time()
        handle = runtime.engine.submit(submission)
        try:
            outcome = _wait(handle, job, runtime)
            generated = time.time()
        finally:
            # Whatever interrupted the wait (RQ's timeout, shutdown), the engine must let go too.
            handle.cancel()
        runtime.publisher.flush()  # its first piece's write is recorded (its end waits for that anyway)
        first_written = runtime.publisher.first_written(job.id)

    queued_s = 0.0
    if job.enqueued_at and job.started_at:
        queued_s = max(0.0, (job.started_at - job.enqueued_at).total_seconds())
    result = GenerationResult(
        text=outcome.text,
        reasoning=outcome.reasoning,
        stop_sequence=outcome.stop_sequence,
        finish_reason=outcome.finish_reason,
        usage=Usage(
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=outcome.cached_tokens),
        ),
        timings=Timings(
            queued_s=queued_s,
            load_s=handle.load_s,
            generate_s=outcome.generate_s,
            first_token_s=None if outcome.first_token_s is None else handle.load_s + outcome.first_token_s,
            hops_ms=hops(job, submitted, outcome.first_token_at, first_written, generated),
        ),
        model=req.model,
        logprobs=outcome.logprobs,
        tool_calls=None if outcome.tool_calls is None else [ToolCall.model_validate(c) for c in outcome.tool_calls],
    )
    logger.info(
        "job finished",
        extra={
            "job_id": job.id,
            "model": req.model,
            "queue_s": round(queued_s, 3),
            "load_s": round(handle.load_s, 3),
            "generate_s": round(outcome.generate_s, 3),
            "tokens": outcome.completion_tokens,
            "prompt_tokens": outcome.prompt_tokens,
            "cached_tokens": outcome.cached_tokens,
            "finish_reason": outcome.finish_reason,
        },
    )
    return result.model_dump()


def hops(
    job: Job, submitted: float, first_token: float | None, first_written: float | None, generated: float
) -> dict[str, float]:
    """Milliseconds from the job's enqueueing to each hop it has made on this worker (Timings.hops_ms)."""
    if job.enqueued_at is None:
        return {}
    enqueued = job.enqueued_at.replace(tzinfo=UTC).timestamp()
    received, accepted = job.meta.get("received_at"), job.meta.get("accepted_at")
    claimed = job.started_at.replace(tzinfo=UTC).timestamp() if job.started_at else None
    at = {
        # By its gateway, before the enqueueing (negative): the request's arrival, then its admission's start.
        "received": float(received) if isinstance(received, (int, float)) else None,
        "accepted": float(accepted) if isinstance(accepted, (int, float)) else None,
        "claimed": claimed,
        "submitted": submitted,
        "first_token": first_token,
        "first_written": first_written,
        "generated": generated,
    }
    return {hop: round(1000 * (when - enqueued), 2) for hop, when in at.items() if when is not None}


def _wait(handle: Generation, job: Job, runtime: Runtime) -> Outcome:
    while not handle.wait(runtime.settings.heartbeat_interval_s):
        runtime.keep_alive(job)
    return handle.result()


@contextmanager
def _errors_recorded(job: Job) -> Iterator[None]:
    """Whatever the block raises is kept on the job in OpenAI's shape, then raised: an MlxqError as it is,
    invalid arguments as InvalidRequest, anything else as GenerationFailed."""
    try:
        yield
    except MlxqError as exc:
        _record_error(job, exc)
        raise
    except ValidationError as exc:
        # Field paths and reasons only: pydantic's own message would quote the prompt into logs.
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        invalid = InvalidRequest(f"Invalid job arguments: {problems}")
        _record_error(job, invalid)
        raise invalid from None
    except Exception as exc:
        _record_error(job, GenerationFailed(f"{type(exc).__name__}: {exc}"))
        raise


def _record_error(job: Any, error: MlxqError) -> None:
    """Keep the error's OpenAI-style dict on the job so a poll can show it as is."""
    job.meta["error"] = error.to_dict()
    until_redis("recording a job's error", job.save_meta)
