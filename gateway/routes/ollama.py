"""Ollama's API (`/api/*`) for editors and tools that speak only it, run as queued jobs.

Answers stream as NDJSON by default (Ollama's `stream: true`), one object per text
piece and a final one with `done: true` and the statistics; errors have Ollama's
shape, `{"error": "..."}`. Like the OpenAI routes, calls go to the interactive
queue and a client that hangs up cancels its job.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from gateway import catalog, submission, waiting
from gateway.deps import ClientDep, GatewayDep, ModelsDep, RedisDep
from gateway.error_shapes import router_for
from gateway.following import follow
from gateway.ollama_api import (
    VERSION,
    ChatRequest,
    GenerateBody,
    ShowRequest,
    done_fields,
    error_body,
    now,
    tool_calls,
)
from shared.schemas import GenerateRequest

router = router_for(error_body, tags=["ollama"])


@router.get("/api/version")
def version() -> dict[str, str]:
    return {"version": VERSION}


def _model_entry(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": model["id"],
        "model": model["id"],
        "modified_at": now(),
        "size": model["size_bytes"] or 0,
        "digest": "",
        "details": {"format": "mlx", "family": "", "families": None, "parameter_size": "", "quantization_level": ""},
    }


@router.get("/api/tags")
def tags(models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """The models that may be requested."""
    return {"models": [_model_entry(m) for m in catalog.listing(models, redis)]}


@router.get("/api/ps")
def running(models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """The models a worker holds now."""
    loaded = [m for m in catalog.listing(models, redis) if m["loaded"]]
    return {"models": [{**_model_entry(m), "size_vram": m["size_bytes"] or 0, "expires_at": now()} for m in loaded]}


@router.post("/api/show")
def show(body: ShowRequest, models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    name = body.model or body.name or ""
    model = catalog.entry(models, redis, name)  # 404 model_not_found when it is not configured
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _model_entry(model)["details"],
        "model_info": _model_info(model),
        "capabilities": ["completion", "tools"],
        "modified_at": now(),
    }


def _model_info(model: dict[str, Any]) -> dict[str, Any]:
    arch = model["architecture"] or "unknown"
    info: dict[str, Any] = {
        "general.architecture": arch,
        "mlxq.source": model["source"],
        "mlxq.loaded": model["loaded"],
    }
    if model["max_model_len"]:
        info[f"{arch}.context_length"] = model["max_model_len"]
    return info


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    return await _call(body.to_generate(), body.stream, request, client, gw, chat=True)


@router.post("/api/generate")
async def generate(body: GenerateBody, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    if not body.prompt:  # Ollama's way to load a model: nothing to generate
        return JSONResponse({"model": body.model, "created_at": now(), "response": "", "done": True})
    return await _call(body.to_generate(), body.stream, request, client, gw, chat=False)


def _piece(model: str, chat: bool, text: str, thinking: str = "") -> dict[str, Any]:
    if chat:
        message = {"role": "assistant", "content": text, **({"thinking": thinking} if thinking else {})}
        return {"model": model, "created_at": now(), "message": message, "done": False}
    return {
        "model": model,
        "created_at": now(),
        "response": text,
        **({"thinking": thinking} if thinking else {}),
        "done": False,
    }


def _final(model: str, chat: bool, result: dict[str, Any], text: str, thinking: str = "") -> dict[str, Any]:
    reason = {"length": "length", "tool_calls": "stop"}.get(result["finish_reason"], "stop")
    document = _piece(model, chat, text, thinking)
    calls = tool_calls(result)
    if chat and calls:
        document["message"]["tool_calls"] = calls
    return {**document, **done_fields(result, reason)}


async def _call(
    generate: GenerateRequest, stream: bool, request: Request, client: ClientDep, gw: GatewayDep, chat: bool
) -> Response:
    done = await submission.accept(gw, client, [generate], "interactive", None)
    job_id = done.ids[0]
    headers = {**done.headers(), "x-mlxq-job-id": job_id}
    if stream:
        lines = _lines(request, job_id, generate.model, chat)
        return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)
    result = await waiting.result(request, job_id)
    final = _final(generate.model, chat, result, result["text"], result.get("reasoning") or "")
    return JSONResponse(final, headers=headers)


async def _lines(request: Request, job_id: str, model: str, chat: bool) -> AsyncIterator[str]:
    """Text and thinking as they are generated; tool calls, whole as Ollama sends them, with the end."""
    ended = False
    try:
        async for entry in follow(request.app.state.streams, job_id):
            if entry.kind == "text" and entry.data["text"]:
                yield json.dumps(_piece(model, chat, entry.data["text"])) + "\n"
            elif entry.kind == "reasoning" and entry.data["text"]:
                yield json.dumps(_piece(model, chat, "", thinking=entry.data["text"])) + "\n"
            elif entry.kind == "end":
                ended = True
                if entry.data["status"] == "finished":
                    result = entry.data["result"]
                    yield json.dumps(_final(model, chat, result, "")) + "\n"
                else:
                    yield json.dumps({"error": waiting.failure(entry.data).message}) + "\n"
    finally:
        if not ended:
            waiting.cancel_quietly(request, job_id)
