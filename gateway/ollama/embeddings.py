"""Ollama's `/api/embed` (and its older `/api/embeddings`), queued and batched like /v1/embeddings.

`input` is a string or a list of them; `truncate` is true by default, as Ollama's:
an input past the model's limit is cut there (false refuses it, in Ollama's words).
The answer carries Ollama's statistics (durations in nanoseconds, the tokens
evaluated). The older route takes one `prompt` and answers one `embedding`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.admission import embedding_jobs
from gateway.deps import ClientDep, GatewayDep
from gateway.error_shapes import router_for
from gateway.http.json_answer import json_answer
from gateway.ollama.shapes import duration_s, error_body
from shared.embeddings import MAX_INPUTS, EmbedRequest

router = router_for(error_body, tags=["ollama"])


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    options: dict[str, Any] | None = None
    """Sampling options mean nothing to an embedding model: accepted, as Ollama accepts them."""
    keep_alive: str | int | float | None = None

    def keep_alive_s(self) -> float | None:
        return None if self.keep_alive is None else duration_s(self.keep_alive, "keep_alive")


class EmbedBody(_Common):
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    truncate: bool = True
    dimensions: Annotated[int, Field(ge=1)] | None = None


class EmbeddingsBody(_Common):
    prompt: Annotated[str, Field(min_length=1)]


@router.post("/api/embed")
async def embed(body: EmbedBody, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    inputs: list[str | list[int]] = [body.input] if isinstance(body.input, str) else list(body.input)
    asked = EmbedRequest(
        model=body.model,
        inputs=inputs,
        truncate=body.truncate,
        dimensions=body.dimensions,
        keep_alive=body.keep_alive_s(),
    )
    done = await embedding_jobs.run(gw, request, client, asked)
    answer = {
        "model": done.request.model,
        "embeddings": done.result["embeddings"],
        "total_duration": int(done.took_s * 1e9),
        "load_duration": int(float(done.result.get("load_s") or 0) * 1e9),
        "prompt_eval_count": int(done.result["prompt_tokens"]),
    }
    return json_answer(answer, done.headers)


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsBody, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    asked = EmbedRequest(model=body.model, inputs=[body.prompt], keep_alive=body.keep_alive_s())
    done = await embedding_jobs.run(gw, request, client, asked)
    return json_answer({"embedding": done.result["embeddings"][0]}, done.headers)
