"""Anthropic's Messages API, `POST /v1/messages`, run as queued jobs like the OpenAI routes.

Streaming sends Anthropic's event types (message_start, content_block_start/delta/stop,
message_delta, message_stop, and ping while the job waits in the queue). A request that
offers tools gets its blocks at the end, since the text may be a call in the model's own
format. Errors have Anthropic's shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.admission import submission
from gateway.anthropic.shapes import (
    CountTokensRequest,
    MessagesRequest,
    error_body,
    error_status,
    message,
    stop_reason,
    stop_sequence,
    tool_use_id,
    usage,
)
from gateway.deps import ClientDep, GatewayDep
from gateway.error_shapes import router_for
from gateway.http.json_answer import json_text
from gateway.http.streaming import StreamingResponse
from gateway.streams import waiting

router = router_for(error_body, error_status, tags=["anthropic"])


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    """Anthropic's Messages API; `stream: true` for its server-sent events."""
    generate = body.to_generate()
    done = await submission.accept(gw, client, [generate], "interactive", None, streamed=bool(body.stream))
    job_id = done.ids[0]
    headers = {**done.headers(), "x-mlxq-job-id": job_id}
    if body.stream:
        prompt_tokens = done.fitted[0].prompt_tokens
        events = _events(request, job_id, body.model, prompt_tokens)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    result = await waiting.result(request, job_id)
    return JSONResponse(message(job_id, body.model, result), headers=headers)


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json_text({'type': kind, **data})}\n\n"


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, gw: GatewayDep) -> dict[str, int]:
    """Anthropic's token count: the prompt as the model sees it (chat template, system and tools included)."""
    fitted = await run_in_threadpool(gw.limits.check, body.to_generate())
    return {"input_tokens": fitted.prompt_tokens}


async def _events(request: Request, job_id: str, model: str, prompt_tokens: int) -> AsyncIterator[str]:
    counted = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}  # what is cached is known at the end
    started = message(job_id, model, {"text": "", "finish_reason": "stop", "usage": counted})
    yield _event("message_start", {"message": {**started, "content": [], "stop_reason": None}})
    blocks = _Blocks()
    async with waiting.streamed(request, job_id) as entries:
        async for entry in entries:
            if entry.kind == "ping":
                yield _event("ping", {})
            elif entry.kind in ("text", "reasoning") and entry.data["text"]:
                kind = "text" if entry.kind == "text" else "thinking"
                for line in blocks.open(
                    kind, {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
                ):
                    yield line
                yield blocks.delta({"type": f"{kind}_delta", kind: entry.data["text"]})
            elif entry.kind == "call":
                block = {
                    "type": "tool_use",
                    "id": tool_use_id(entry.data["id"]),
                    "name": entry.data["name"],
                    "input": {},
                }
                for line in blocks.open("tool_use", block, new=True):
                    yield line
            elif entry.kind == "arguments" and entry.data["text"] and blocks.kind == "tool_use":
                yield blocks.delta({"type": "input_json_delta", "partial_json": entry.data["text"]})
            elif entry.kind == "end":
                if entry.data["status"] != "finished":
                    error = waiting.failure(entry.data)
                    yield _event("error", {"error": {"type": "api_error", "message": error.message}})
                    return
                result = entry.data["result"]
                for line in blocks.close():
                    yield line
                delta = {"stop_reason": stop_reason(result), "stop_sequence": stop_sequence(result)}
                yield _event("message_delta", {"delta": delta, "usage": usage(result)})
                yield _event("message_stop", {})


class _Blocks:
    """The content blocks of a streamed message: one open at a time, numbered as they open."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def open(self, kind: str, block: dict[str, Any], new: bool = False) -> list[str]:
        """Start a block of `kind` unless one is open already (`new`: always another one)."""
        if self.kind == kind and not new:
            return []
        lines = self.close()
        self.index += 1
        self.kind = kind
        return [*lines, _event("content_block_start", {"index": self.index, "content_block": block})]

    def delta(self, delta: dict[str, Any]) -> str:
        return _event("content_block_delta", {"index": self.index, "delta": delta})

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        lines = []
        if self.kind == "thinking":
            # A local model's thinking carries no signature; the field is there, empty, as clients expect.
            lines.append(self.delta({"type": "signature_delta", "signature": ""}))
        self.kind = None
        return [*lines, _event("content_block_stop", {"index": self.index})]
