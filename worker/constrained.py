"""Structured output: a row's logits processor that only lets through tokens that keep its text
on the way to JSON matching its schema (llguidance compiles the schema and computes each mask).

Each row has its own matcher, so rows with different schemas (or none) share a batch. The
processor sees the row's token context: from the second call on, its last token is the one
sampled after the previous mask, which the matcher consumes before computing the next. Once
the JSON is complete only end-of-text is allowed, so the row ends there.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

from shared.errors import InvalidRequest
from shared.schemas import json_schema_grammar

logger = logging.getLogger(__name__)


def ll_tokenizer(tokenizer: Any) -> LLTokenizer:
    """llguidance's view of the model's tokenizer, built once per loaded tokenizer (about a second)."""
    hf = tokenizer._tokenizer
    cached: LLTokenizer | None = getattr(hf, "_mlxq_llguidance", None)
    if cached is None:
        cached = from_tokenizer(hf, eos_token=sorted(tokenizer.eos_token_ids))
        hf._mlxq_llguidance = cached
    return cached


class JsonConstraint:
    def __init__(self, tokenizer: Any, schema: dict[str, Any]) -> None:
        self.matcher = LLMatcher(ll_tokenizer(tokenizer), json_schema_grammar(schema))
        if self.matcher.is_error():
            raise InvalidRequest(f"The JSON schema cannot be enforced: {self.matcher.get_error()}", param="json_schema")
        self.started = False

    def advance(self, last: int) -> None:
        """One step, whose context ends with `last` (the token sampled after the previous mask)."""
        if self.started and not self.matcher.consume_token(last):
            # Not the matcher's message: it may quote the generated text.
            logger.warning("structured output: the matcher refused a sampled token; the row goes on unconstrained")
        self.started = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        last: int = tokens[-1].item()  # type: ignore[assignment]
        self.advance(last)
        allowed = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)
        vocab = logits.shape[-1]
        mask = np.zeros(vocab, dtype=bool)
        n = min(vocab, allowed.size)
        mask[:n] = allowed[:n] > 0
        if not mask.any():
            return logits  # the matcher is in an error state (logged above): nothing left to enforce
        return mx.where(mx.array(mask)[None, :], logits, mx.array(-float("inf"), dtype=logits.dtype))
