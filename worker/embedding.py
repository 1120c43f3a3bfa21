"""Embedding and reranking jobs on the engine thread: vectors from an embedding model, in batches.

An embedding model (BERT, XLM-RoBERTa, ModernBERT, Qwen3-Embedding,
EmbeddingGemma) is read by mlx-embeddings, the library made for them, with its
pooling and normalisation as each model's config says (`text_embeds`). A job's
inputs are encoded once, sorted by length and run in batches of similar lengths
(`EMBED_BATCH` inputs, at most `EMBED_BATCH_TOKENS` tokens with the padding),
one batch per engine turn between decode steps, so running streams pause no
longer than one batch however many inputs wait. Padding is masked: an input's
vector is the same alone and in any batch (to float tolerance).

A rerank job scores documents against a query: by an embedding model, the cosine
of each document's vector to the query's (a bi-encoder); by an LLM reranker
(`kind = "rerank"`, such as Qwen3-Reranker), its own yes/no judgement of each
document (worker/reranking.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from shared.embeddings import DEFAULT_MAX_TOKENS, EmbedRequest, input_field, too_long
from shared.errors import GenerationCanceled, InvalidRequest
from shared.models import ModelSpec
from worker import reranking

EMBED_BATCH = 32
"""Inputs in one forward pass."""

EMBED_BATCH_TOKENS = 8192
"""Tokens of one forward pass, padding included: a batch of long inputs is smaller."""


def read(directory: Path) -> tuple[Any, Any]:
    """An embedding model and its tokenizer, by mlx-embeddings."""
    from mlx_embeddings.utils import load

    model, tokenizer = load(str(directory))
    return model, tokenizer


def vocabulary(model: Any) -> int:
    """The size of the model's embedding table: token ids past it are refused."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    raise ValueError("the embedding model's config names no vocab_size")


def max_tokens(model: Any) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_TOKENS)


@dataclass
class EmbedWork:
    """One job's inputs on their way through the engine, and what it is waiting for."""

    job_id: str
    request: EmbedRequest
    spec: ModelSpec
    ids: list[list[int]] = field(default_factory=list)
    vectors: list[list[float] | None] = field(default_factory=list)
    prompt_tokens: int = 0
    truncated: int = 0
    load_s: float = 0.0
    judged: bool = False
    """Scored by an LLM reranker: each "vector" is its document's score alone."""
    error: BaseException | None = None
    _order: list[int] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _canceled: threading.Event = field(default_factory=threading.Event)

    def encode(self, tokenizer: Any, limit: int, vocabulary: int) -> None:
        """Every input as token ids, cut to `limit` when the request allows it, refused past it when not. Ids
        are checked against the `vocabulary`'s size: MLX reads past an embedding table without a word."""
        query = self.request.query is not None
        for index, item in enumerate(self.request.texts()):
            self.stop_if_canceled()
            if isinstance(item, list) and any(not 0 <= i < vocabulary for i in item):
                field = input_field(index, query)
                raise InvalidRequest(
                    f"{field} holds token ids outside the vocabulary (0-{vocabulary - 1})", param=field
                )
            ids = list(item) if isinstance(item, list) else list(tokenizer.encode(item, add_special_tokens=True))
            if len(ids) > limit:
                if not self.request.truncate:
                    raise too_long(input_field(index, query), len(ids), limit)
                ids = ids[:limit]
                self.truncated += 1
            self.ids.append(ids)
        self._ready()

    def encode_judged(self, tokenizer: Any, limit: int) -> None:
        """A rerank by an LLM reranker: each document in its judging prompt (worker/reranking.py), the document
        cut where the prompt would pass `limit`; nothing for the query alone."""
        assert self.request.query is not None
        cue = list(tokenizer.encode(reranking.SUFFIX, add_special_tokens=False))
        for document in self.request.inputs:
            self.stop_if_canceled()
            text = document if isinstance(document, str) else tokenizer.decode(document)
            asked = reranking.prompt(self.request.query, text)[: -len(reranking.SUFFIX)]
            ids = list(tokenizer.encode(asked, add_special_tokens=False))
            if len(ids) + len(cue) > limit:
                ids = ids[: max(1, limit - len(cue))]
                self.truncated += 1
            self.ids.append(ids + cue)
        self.judged = True
        self._ready()

    def check_width(self, width: int) -> None:
        """The model's vectors have `width` numbers: with OpenAI's rules a `dimensions` past it is refused, on the
        first batch rather than once every input has run."""
        asked = self.request.dimensions
        if self.request.strict_dimensions and asked is not None and asked > width:
            raise InvalidRequest(f"dimensions is {asked}; this model's vectors have {width}", param="dimensions")

    def stop_if_canceled(self) -> None:
        """Before each batch, and between two inputs' encodings: 2,048 long ones take seconds on the engine
        thread, and a cancel or a stop (which hands the job back) must not wait for all of them."""
        if self._canceled.is_set():
            raise GenerationCanceled("The job was canceled while it was running")

    def _ready(self) -> None:
        self.prompt_tokens = sum(len(ids) for ids in self.ids)
        self.vectors = [None] * len(self.ids)
        self._order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))

    @property
    def remaining(self) -> int:
        return len(self._order)

    def next_batch(self, tokens: int = EMBED_BATCH_TOKENS) -> list[int]:
        """The indices of the next batch: the shortest inputs left, as many as fit in `tokens` (padded)."""
        batch: list[int] = []
        for index in self._order:
            longest = len(self.ids[index])  # sorted: the longest of the batch so far
            if batch and (len(batch) >= EMBED_BATCH or longest * (len(batch) + 1) > min(tokens, EMBED_BATCH_TOKENS)):
                break
            batch.append(index)
        del self._order[: len(batch)]
        return batch

    def cancel(self) -> None:
        self._canceled.set()

    @property
    def canceled(self) -> bool:
        return self._canceled.is_set()

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


def forward(model: Any, rows: list[list[int]], pad_id: int) -> list[list[float]]:
    """The pooled, normalised vector of each row, padded to the longest and masked."""
    width = max(len(row) for row in rows)
    ids = mx.array([row + [pad_id] * (width - len(row)) for row in rows])
    mask = mx.array([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    out = model(ids, attention_mask=mask)
    vectors = getattr(out, "text_embeds", None)
    if vectors is None:  # a model that pools nothing itself: the mean of its last layer, normalised
        hidden = out.last_hidden_state
        weights = mask[..., None].astype(hidden.dtype)
        vectors = (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1)
        vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-9)
    result: list[list[float]] = vectors.astype(mx.float32).tolist()
    return result


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def shaped(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` of a vector, normalised again (how Matryoshka models shorten theirs)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    cut = vector[:dimensions]
    norm = sum(x * x for x in cut) ** 0.5 or 1.0
    return [x / norm for x in cut]


def scores(query: list[float], documents: list[list[float]]) -> list[float]:
    """The cosine of each document's vector to the query's (the vectors are normalised)."""
    return [sum(q * d for q, d in zip(query, doc, strict=True)) for doc in documents]
