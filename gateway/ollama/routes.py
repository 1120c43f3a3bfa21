"""Ollama's API (`/api/*`) for editors and tools that speak only it, run as queued jobs.

Answers stream as NDJSON by default (Ollama's `stream: true`), one object per text
piece and a final one with `done: true` and the statistics; errors have Ollama's
shape, `{"error": "..."}`. Like the OpenAI routes, calls go to the interactive
queue and a client that hangs up cancels its job.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from gateway.admission import submission
from gateway.deps import AdminDep, ClientDep, GatewayDep, ModelsDep, RedisDep, SettingsDep, sees_everything
from gateway.error_shapes import router_for
from gateway.http.json_answer import json_text
from gateway.http.streaming import StreamingResponse
from gateway.models import catalog, management
from gateway.ollama.shapes import (
    VERSION,
    ChatRequest,
    CopyRequest,
    DeleteRequest,
    GenerateBody,
    PullRequest,
    ShowRequest,
    done_fields,
    error_body,
    now,
    tool_calls,
)
from gateway.operations.admin_routes import progress_lines
from gateway.streams import waiting
from shared.models import ModelRegistry
from shared.schemas import GenerateRequest

router = router_for(error_body, tags=["ollama"])

FOREVER = datetime(2318, 1, 1, tzinfo=UTC)
"""What Ollama shows as a kept-for-ever model's expiry."""


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
        # Ollama's own word for what a model can do: an embedding model's is "embedding".
        "capabilities": ["embedding"] if model.get("kind") == "embed" else ["completion"],
    }


@router.get("/api/tags")
def tags(models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """The models that may be requested."""
    return {"models": [_model_entry(m) for m in catalog.listing(models, redis)]}


@router.get("/api/ps")
def running(models: ModelsDep, redis: RedisDep) -> dict[str, Any]:
    """The models a worker holds now, and when each will be unloaded if it stays idle."""
    loaded = [m for m in catalog.listing(models, redis) if m["loaded"]]
    return {
        "models": [
            {**_model_entry(m), "size_vram": m["size_bytes"] or 0, "expires_at": _expiry(m["expires_at"])}
            for m in loaded
        ]
    }


def _expiry(at: float | None) -> str:
    """Ollama's expires_at; a model serving, pinned or kept for ever shows Ollama's far future."""
    when = datetime.fromtimestamp(min(at, FOREVER.timestamp()), UTC) if at is not None else FOREVER
    return when.isoformat().replace("+00:00", "Z")


@router.post("/api/pull")
async def pull(body: PullRequest, models: ModelsDep, redis: RedisDep, settings: SettingsDep, _admin: AdminDep) -> Any:
    """Download a hub repo as a model, with Ollama's progress lines (its name here: as given)."""
    name = body.model or body.name or ""
    record = await run_in_threadpool(management.pull, redis, settings, models, body.repo(), name, {})
    lines = _pull_lines(redis, models, record["name"], body.repo())
    if body.stream:
        return StreamingResponse(lines, media_type="application/x-ndjson")
    last: dict[str, Any] = {}
    async for line in lines:
        last = json.loads(line)
    if "error" in last:
        return JSONResponse(last, status_code=502)
    return last


async def _pull_lines(redis: Any, models: ModelRegistry, name: str, repo: str) -> AsyncIterator[str]:
    yield json.dumps({"status": "pulling manifest"}) + "\n"
    async for line in progress_lines(redis, models, name):
        record = json.loads(line)
        if record["state"] == "failed":
            yield json.dumps({"error": f"pull of {repo} failed: {record.get('error')}"}) + "\n"
            return
        if record.get("total_bytes"):
            progress = {"total": record["total_bytes"], "completed": min(record["done_bytes"], record["total_bytes"])}
            yield json.dumps({"status": f"pulling {repo}", "digest": repo, **progress}) + "\n"
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield json.dumps({"status": status}) + "\n"


@router.delete("/api/delete")
def delete(body: DeleteRequest, models: ModelsDep, redis: RedisDep, settings: SettingsDep, _admin: AdminDep) -> Any:
    name = body.model or body.name or ""
    if models.find(name) is None:
        return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)
    management.remove(redis, settings, models, name)
    return Response(status_code=200)


@router.post("/api/copy")
def copy(body: CopyRequest, models: ModelsDep, redis: RedisDep, settings: SettingsDep, _admin: AdminDep) -> Any:
    if models.find(body.source) is None:
        return JSONResponse({"error": f"model '{body.source}' not found"}, status_code=404)
    management.copy(redis, settings, models, body.source, body.destination)
    return Response(status_code=200)


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
    if not body.prompt:  # Ollama's way to load a model (or with keep_alive 0, to unload it)
        redis, models = request.app.state.redis, request.app.state.models
        unload = body.keep_alive_s() == 0
        # What the admin routes do, only for whoever may call them; for others it is the answer alone.
        act = management.unload if unload else management.load
        if sees_everything(request):
            await run_in_threadpool(act, redis, models, body.model)
        else:
            await run_in_threadpool(models.get, body.model)  # a name not known yet is looked up in Redis
        done = {"done": True, "done_reason": "unload" if unload else "load"}
        return JSONResponse({"model": body.model, "created_at": now(), "response": "", **done})
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
    done = await submission.accept(gw, client, [generate], "interactive", None, streamed=stream)
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
    async with waiting.streamed(request, job_id, pings=False) as entries:
        async for entry in entries:
            if entry.kind == "text" and entry.data["text"]:
                yield json_text(_piece(model, chat, entry.data["text"])) + "\n"
            elif entry.kind == "reasoning" and entry.data["text"]:
                yield json_text(_piece(model, chat, "", thinking=entry.data["text"])) + "\n"
            elif entry.kind == "end":
                if entry.data["status"] == "finished":
                    result = entry.data["result"]
                    yield json_text(_final(model, chat, result, "")) + "\n"
                else:
                    yield json_text({"error": waiting.failure(entry.data).message}) + "\n"
