"""An LLM reranker's scores: each document judged against the query by the model's own yes/no.

A reranker such as Qwen3-Reranker is a causal language model asked, for each
document, whether it meets the query; its score is the probability of "yes"
against "no" at the answer's first token, as its model card computes it. Its
rows are right-padded into one batch: a causal model's logits at a row's last
token see only that row's tokens before it, so padding after it changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

DEFAULT_CONTEXT = 8192
"""A judging prompt's tokens when the model's context is not known."""

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def prompt(query: str, document: str) -> str:
    return f"{PREFIX}<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {document}{SUFFIX}"


@dataclass(frozen=True)
class Judge:
    """What a loaded reranker's scores are read from."""

    yes: int
    no: int
    """The first token of "yes" and of "no" in the model's vocabulary."""
    head_apart: bool
    """Whether its logits are its head over its backbone's hidden states (`judge`)."""


def judge(model: Any, tokenizer: Any) -> Judge:
    """The reranker's answer tokens, and whether its logits are its head over its backbone's last hidden
    states (as mlx-lm's llama, qwen and mistral families compute them), tried on a few tokens: a family that
    scales or caps its logits, or is built otherwise, keeps the whole forward."""
    yes = tokenizer.encode("yes", add_special_tokens=False)
    no = tokenizer.encode("no", add_special_tokens=False)
    probe = mx.array([[1, 2, 3, 4]])
    try:
        whole = model(probe)[:, -1].astype(mx.float32)
        apart = _head(model, model.model(probe)[:, -1]).astype(mx.float32)
        head_apart = whole.shape == apart.shape and bool(mx.allclose(whole, apart, rtol=1e-3, atol=1e-3).item())
    except Exception:
        head_apart = False
    return Judge(int(yes[0]), int(no[0]), head_apart)


def forward(model: Any, rows: list[list[int]], judged: Judge) -> list[list[float]]:
    """Each row's probability of "yes" against "no" after its last token, as a one-element vector."""
    width = max(len(row) for row in rows)
    tokens = mx.array([row + [0] * (width - len(row)) for row in rows])
    last = mx.array([len(row) - 1 for row in rows])
    # The vocabulary's logits at every position of a batch of 8,192 tokens would take 2.5 GB for a 150k
    # vocabulary, outside the memory the worker counts: only the rows' last positions go through the head.
    if judged.head_apart:
        picked = _head(model, model.model(tokens)[mx.arange(len(rows)), last])
    else:
        picked = model(tokens)[mx.arange(len(rows)), last]
    pairs: list[list[float]] = picked.astype(mx.float32)[:, mx.array([judged.yes, judged.no])].tolist()  # type: ignore[assignment]
    return [[1.0 / (1.0 + math.exp(n - y))] for y, n in pairs]


def _head(model: Any, hidden: mx.array) -> mx.array:
    head = getattr(model, "lm_head", None)
    logits: mx.array = head(hidden) if head is not None else model.model.embed_tokens.as_linear(hidden)
    return logits
