"""Log probabilities of generated tokens, in OpenAI's chat shape.

BatchGenerator hands each row the log-softmax it sampled from (after the row's
logits processors, before temperature), so a token's entry is read from it; the
top alternatives come from a partial sort of the same vector. Only rows that ask
pay for it: one small device-to-host copy a token.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

IMPOSSIBLE = -9999.0
"""What OpenAI reports for a token that had no chance (a logprob of -inf, or not a number at all):
JSON has no infinities."""


def _named(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    # A token may be part of a character (byte-level vocabularies): its text is then "\ufffd";
    # `bytes` is the UTF-8 of what decoding it alone gives, as OpenAI's field is for reassembly.
    text = tokenizer.decode([token])
    value = logprob if math.isfinite(logprob) else IMPOSSIBLE
    return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}


def entry(tokenizer: Any, token: int, logprobs: mx.array, top: int) -> dict[str, Any]:
    """The token's entry: its text, log probability, UTF-8 bytes and the `top` likeliest tokens."""
    vector = logprobs.reshape(-1)
    score: float = vector[token].item()  # type: ignore[assignment]
    found = _named(tokenizer, token, score)
    alternatives: list[dict[str, Any]] = []
    if top > 0:
        k = min(top, vector.shape[0])
        best = mx.argpartition(-vector, kth=k - 1)[:k]
        values = vector[best]
        order = mx.argsort(-values)
        ids: list[int] = best[order].tolist()  # type: ignore[assignment]
        scores: list[float] = values[order].tolist()  # type: ignore[assignment]
        for index, value in zip(ids, scores, strict=True):
            alternatives.append(_named(tokenizer, index, value))
    found["top_logprobs"] = alternatives
    return found
