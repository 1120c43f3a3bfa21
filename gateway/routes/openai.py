"""OpenAI-compatible `/v1/chat/completions` and `/v1/completions`, run as queued jobs.

They go ahead of submit-and-poll jobs and batches (the `interactive` queue).
Streaming sends tokens as the worker makes them (worker → Redis Stream → SSE);
a client that hangs up cancels its job, streaming or not. A non-streaming call waits up to
`MLXQ_OPENAI_WAIT_S`, then answers 504 with the job id: the job goes on and can
be polled at `/v1/jobs/{id}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from gateway import jobs, submission
from gateway.deps import ClientDep, GatewayDep
from gateway.following import WaitedTooLong, follow
from gateway.openai_api import ChatCompletionRequest, CompletionRequest, Shapes
from shared.errors import JobFailed, JobWaitTimeout, MlxqError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])

DISCONNECT_POLL_S = 0.5
"""How often a waiting non-streaming call looks whether its client is still there."""


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, client: ClientDep, gw: GatewayDep
) -> Response:
    """OpenAI's chat completion; `stream: true` for server-sent chunks."""
    return await _call(body, request, client, gw, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    """OpenAI's (legacy) text completion; `stream: true` for server-sent chunks."""
    return await _call(body, request, client, gw, chat=False)


async def _call(
    body: ChatCompletionRequest | CompletionRequest, request: Request, client: ClientDep, gw: GatewayDep, chat: bool
) -> Response:
    priority = submission.allowed_priority(body.priority, "interactive")
    generate = body.to_generate()
    idem = submission.idempotency(request, body.model_dump_json(), "")
    done = await submission.admit(gw, client, [generate], priority, idem)
    job_id = done.ids[0]
    shapes = Shapes(chat, job_id, body.model)
    headers = {**done.headers(), "x-mlxq-job-id": job_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(request, job_id, shapes, include_usage, buffered=generate.offers_tools()),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
        )
    try:
        result = await result_unless_gone(request, job_id, time.monotonic() + gw.settings.openai_wait_s)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the job is canceled
    except WaitedTooLong:
        timeout = JobWaitTimeout(
            f"The job {job_id} did not finish within {gw.settings.openai_wait_s:g} s; it goes on: "
            f"poll GET /v1/jobs/{job_id} for its result",
            param=job_id,
        )
        timeout.extra_headers = {"x-mlxq-job-id": job_id}
        raise timeout from None
    except JobFailed as failed:
        failed.extra_headers = {"x-mlxq-job-id": job_id}
        raise
    return JSONResponse(shapes.complete(result), headers=headers)


class ClientGone(Exception):
    """The client hung up before its result was ready."""


async def result_unless_gone(request: Request, job_id: str, deadline: float) -> dict[str, Any]:
    """`_result`, unless the client hangs up first: then its job is canceled (nobody would read it)."""
    waiting = asyncio.ensure_future(_result(request, job_id, deadline))
    watching = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watching.done() and not watching.cancelled()
        watching.cancel()
    if not gone:
        return await waiting
    waiting.cancel()
    logger.info("client went away before its result; canceling its job", extra={"job_id": job_id})
    cancel_quietly(request, job_id)
    raise ClientGone(job_id)


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def cancel_quietly(request: Request, job_id: str) -> None:
    try:
        redis = request.app.state.redis
        jobs.cancel(jobs.fetch(job_id, redis), redis, request.app.state.settings.stream_ttl_s)
    except MlxqError:
        pass  # it ended meanwhile


async def _result(request: Request, job_id: str, deadline: float) -> dict[str, Any]:
    """The job's result once it has ended; its error, as ours, if it did not finish."""
    async for entry in follow(request.app.state.aredis, job_id, deadline=deadline):
        if entry.kind != "end":
            continue
        if entry.data["status"] == "finished":
            result: dict[str, Any] = entry.data["result"]
            return result
        raise failure(entry.data)
    raise JobFailed({"message": f"the stream of job {job_id} ended without an end"})


def failure(data: dict[str, Any]) -> JobFailed:
    return JobFailed(data.get("error") or {"message": f"the job ended as {data.get('status')}"})


async def _stream(
    request: Request, job_id: str, shapes: Shapes, include_usage: bool, buffered: bool = False
) -> AsyncIterator[str]:
    """The job as OpenAI chunks. `buffered` (a request offering tools): the text may be a tool call
    in the model's own format, so the answer comes in one chunk at the end, calls as deltas."""
    ended = False
    try:
        yield _sse(shapes.chunk(first=True))
        async for entry in follow(request.app.state.aredis, job_id, pings=True):
            if entry.kind == "ping":
                yield ": ping\n\n"  # an SSE comment: clients ignore it, proxies see the stream alive
            elif entry.kind == "text" and not buffered:
                yield _sse(shapes.chunk(text=entry.data["text"], entries=entry.data.get("logprobs")))
            elif entry.kind == "end":
                ended = True
                if entry.data["status"] == "finished":
                    result = entry.data["result"]
                    if buffered:
                        yield _sse(shapes.tool_calls_chunk(result))
                    yield _sse(shapes.chunk(finish_reason=result["finish_reason"]))
                    if include_usage:
                        yield _sse(shapes.usage_chunk(result))
                else:
                    yield _sse(failure(entry.data).to_body())
        yield "data: [DONE]\n\n"
    finally:
        if not ended:
            # The client hung up mid-stream: nobody will read the rest, so free the worker.
            logger.info("stream client went away; canceling its job", extra={"job_id": job_id})
            cancel_quietly(request, job_id)


def _sse(document: dict[str, Any]) -> str:
    return f"data: {json.dumps(document)}\n\n"
