"""An embedding or rerank job's request, as the gateway writes it and the worker runs it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InvalidRequest

MAX_INPUTS = 2048
"""Inputs one request may carry (OpenAI's limit): a 2,000-chunk document is one job, run in batches."""

DEFAULT_MAX_TOKENS = 512
"""An input's tokens when the model's config names no limit (BERT's)."""

Input = Annotated[str, Field(max_length=1_000_000)] | Annotated[list[int], Field(min_length=1, max_length=100_000)]


class EmbedRequest(BaseModel):
    """Vectors for `inputs` (texts or token ids); for a rerank, `query`'s scores against them."""

    model_config = ConfigDict(extra="forbid")

    model: str
    inputs: Annotated[list[Input], Field(min_length=1, max_length=MAX_INPUTS)]
    truncate: bool = Field(default=True, description="cut an input past the model's limit rather than refuse it")
    dimensions: Annotated[int, Field(ge=1)] | None = None
    strict_dimensions: bool = Field(
        default=False,
        description="refuse `dimensions` past the model's vectors (OpenAI) rather than give them whole (Ollama)",
    )
    query: str | None = Field(default=None, description="a rerank: the query the inputs are scored against")
    keep_alive: float | None = None
    kind: Literal["embed", "rerank"] = "embed"

    def texts(self) -> list[str | list[int]]:
        """What the model encodes: the query first for a rerank, then the inputs."""
        return [*([self.query] if self.query is not None else []), *self.inputs]


def input_field(index: int, query: bool) -> str:
    """How a request names the `index`th text it encodes (`texts()`: the query first for a rerank)."""
    return "query" if query and index == 0 else f"input[{index - query}]"


def too_long(field: str, tokens: int, limit: int) -> InvalidRequest:
    """The refusal of an input past the model's limit, in the gateway's words and the worker's alike."""
    return InvalidRequest(f"{field} has {tokens} tokens; this model takes at most {limit} an input", param=field)
