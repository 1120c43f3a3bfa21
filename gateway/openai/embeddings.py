"""OpenAI's `/v1/embeddings`, and `/v1/rerank` in the shape Jina's and Cohere's clients send (as llama.cpp's
server answers it), each a queued job run in batches by the worker (gateway/admission/embedding_jobs.py).

`input` is a string, a list of strings, a list of token ids or a list of those;
`encoding_format` `float` or `base64` (little-endian float32, as OpenAI's Python
SDK asks by default and decodes); `dimensions` keeps a vector's first ones,
normalised again (as Matryoshka models are shortened). An input longer than the
model takes is refused, as OpenAI does; errors have OpenAI's shape.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Annotated, Any, Literal

from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.admission import embedding_jobs
from gateway.deps import ClientDep, GatewayDep
from gateway.error_shapes import openai_error, router_for
from gateway.http.json_answer import json_answer
from shared.embeddings import MAX_INPUTS, EmbedRequest

router = router_for(openai_error, tags=["openai"])

Text = Annotated[str, Field(min_length=1)]
Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
        | Ids
        | Annotated[list[Ids], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, int) for item in self.input):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


class Document(BaseModel):
    text: str


class RerankBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    query: Annotated[str, Field(min_length=1)]
    documents: Annotated[list[Text | Document], Field(min_length=1, max_length=MAX_INPUTS - 1)]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = True
    """Jina's default (Cohere's is false): Open WebUI reads the documents back."""
    max_chunks_per_doc: int | None = None
    """Cohere's older field: long documents are cut to the model's limit here, never split."""

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsBody, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    """OpenAI's embeddings: one vector per input, in order."""
    asked = EmbedRequest(
        model=body.model, inputs=body.inputs(), truncate=False, dimensions=body.dimensions, strict_dimensions=True
    )
    done = await embedding_jobs.run(gw, request, client, asked)
    vectors: list[list[float]] = done.result["embeddings"]
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
        for i, vector in enumerate(vectors)
    ]
    tokens = int(done.result["prompt_tokens"])
    answer = {
        "object": "list",
        "data": data,
        "model": done.request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json_answer(answer, done.headers)


@router.post("/v1/rerank")
@router.post("/rerank", include_in_schema=False)
async def rerank(body: RerankBody, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    """Documents scored against a query, most relevant first: `results` of `index` and `relevance_score`
    (and `document` unless `return_documents` is false), at most `top_n`."""
    texts = body.texts()
    asked = EmbedRequest(model=body.model, inputs=list(texts), query=body.query, kind="rerank")
    done = await embedding_jobs.run(gw, request, client, asked)
    scored = sorted(enumerate(done.result["scores"]), key=lambda pair: -pair[1])[: body.top_n]
    results: list[dict[str, Any]] = []
    for index, score in scored:
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if body.return_documents:
            result["document"] = {"text": texts[index]}
        results.append(result)
    tokens = int(done.result["prompt_tokens"])
    answer = {
        "object": "list",
        "model": done.request.model,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json_answer(answer, done.headers)


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    # A value JSON cannot hold (a model's NaN) came through the job's stream as null.
    values = [math.nan if value is None else value for value in vector]
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
