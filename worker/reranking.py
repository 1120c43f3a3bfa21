"""An LLM reranker's scores: each document judged against the query by the model's own yes/no.

A reranker such as Qwen3-Reranker is a causal language model asked, for each
document, whether it meets the query; its score is the probability of "yes"
against "no" at the answer's first token, as its model card computes it. Its
rows are right-padded into one batch: a causal model's logits at a row's last
token see only that row's tokens before it, so padding after it changes nothing.
"""

from __future__ import annotations

import math
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


def answer_ids(tokenizer: Any) -> tuple[int, int]:
    """The first token of "yes" and of "no" in the model's vocabulary."""
    yes = tokenizer.encode("yes", add_special_tokens=False)
    no = tokenizer.encode("no", add_special_tokens=False)
    return int(yes[0]), int(no[0])


def forward(model: Any, rows: list[list[int]], yes: int, no: int) -> list[list[float]]:
    """Each row's probability of "yes" against "no" after its last token, as a one-element vector."""
    width = max(len(row) for row in rows)
    logits = model(mx.array([row + [0] * (width - len(row)) for row in rows]))
    last = mx.array([len(row) - 1 for row in rows])
    picked = logits[mx.arange(len(rows)), last].astype(mx.float32)
    pairs: list[list[float]] = picked[:, mx.array([yes, no])].tolist()
    return [[1.0 / (1.0 + math.exp(n - y))] for y, n in pairs]
