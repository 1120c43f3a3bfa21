"""OpenAI-compatible `/v1/chat/completions` and `/v1/completions`, run as queued jobs.

They go ahead of submit-and-poll jobs and batches (the `interactive` queue).
Streaming sends tokens as the worker makes them (worker → Redis Stream → SSE);
a client that hangs up cancels its job, streaming or not. A non-streaming call
waits for its result as every protocol does (gateway/streams/waiting.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from gateway.admission import submission
from gateway.deps import ClientDep, GatewayDep
from gateway.error_shapes import openai_error, router_for
from gateway.http.json_answer import json_text
from gateway.http.streaming import StreamingResponse
from gateway.openai.shapes import ChatCompletionRequest, CompletionRequest, Shapes
from gateway.streams import waiting

router = router_for(openai_error, tags=["openai"])


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
    done = await submission.accept(gw, client, [generate], priority, idem, streamed=bool(body.stream))
    job_id = done.ids[0]
    shapes = Shapes(chat, job_id, body.model)
    headers = {**done.headers(), "x-mlxq-job-id": job_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(request, job_id, shapes, include_usage),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
        )
    result = await waiting.result(request, job_id)
    return JSONResponse(shapes.complete(result), headers=headers)


async def _stream(request: Request, job_id: str, shapes: Shapes, include_usage: bool) -> AsyncIterator[str]:
    """The job as OpenAI chunks: text and reasoning as they are generated, a tool call as it forms
    (its id and name, then its arguments)."""
    async with waiting.streamed(request, job_id) as entries:
        yield _sse(shapes.chunk(first=True))
        async for entry in entries:
            if entry.kind == "ping":
                yield ": ping\n\n"  # an SSE comment: clients ignore it, proxies see the stream alive
            elif entry.kind == "text":
                yield _sse(shapes.chunk(text=entry.data["text"], entries=entry.data.get("logprobs")))
            elif entry.kind in ("reasoning", "call", "arguments"):
                if entry.kind == "reasoning":
                    yield _sse(shapes.reasoning_chunk(entry.data["text"]))
                elif entry.kind == "call":
                    yield _sse(shapes.call_chunk(entry.data["index"], entry.data["id"], entry.data["name"]))
                else:
                    yield _sse(shapes.arguments_chunk(entry.data["index"], entry.data["text"]))
                if entry.data.get("logprobs"):
                    # Every generated token's logprobs, as the answer put together has them.
                    yield _sse(shapes.chunk(entries=entry.data["logprobs"]))
            elif entry.kind == "end":
                if entry.data["status"] == "finished":
                    result = entry.data["result"]
                    yield _sse(shapes.chunk(finish_reason=result["finish_reason"]))
                    if include_usage:
                        yield _sse(shapes.usage_chunk(result))
                else:
                    yield _sse(waiting.failure(entry.data).to_body())
        yield "data: [DONE]\n\n"


def _sse(document: dict[str, Any]) -> str:
    return f"data: {json_text(document)}\n\n"
