"""A request's sampling, per row of a batch: its sampler and its logits processors.

Each row has its own: a sampler with its own random key when it has a seed (so
its output does not depend on which other requests share the batch), and a list
of processors (bias, penalties, a JSON schema's mask, the reasoning budget) that
no other row sees. A processor that keeps a state has `advance`, so a job carried
on after a crash walks it through the steps it had taken (worker/rows.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from shared.errors import InvalidRequest
from shared.schemas import GenerateRequest
from worker.constrained import JsonConstraint
from worker.output_split import OutputSplit

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


_SHARED: dict[tuple[float, float, float, int], Sampler] = {}
"""Unseeded samplers by (temperature, top_p, min_p, top_k): rows that share one are sampled in one
batched call."""


def sampler_for(request: GenerateRequest, vocab_size: int, skip: int = 0) -> Sampler:
    """The request's sampler: shared by requests asking the same without a seed, its own with one
    (past `skip` steps: a job carried on after a crash samples as it would have)."""
    top_p = request.top_p if request.top_p < 1.0 else 0.0
    top_k = request.top_k if request.top_k < vocab_size else 0  # all of the vocabulary: no cut
    if request.seed is None or request.temperature == 0:
        key = (request.temperature, top_p, request.min_p, top_k)
        if key not in _SHARED:
            _SHARED[key] = make_sampler(temp=request.temperature, top_p=top_p, min_p=request.min_p, top_k=top_k)
        return _SHARED[key]
    return _keyed(request.seed, request.temperature, top_p, request.min_p, top_k, skip)


def _keyed(seed: int, temperature: float, top_p: float, min_p: float, top_k: int, skip: int = 0) -> Sampler:
    """A sampler with a random key of its own, split every step: the same seed gives the same text
    alone, in any batch, joining at any step (MLX's global seed is shared by every row)."""
    key = mx.random.key(seed)
    for _ in range(skip):
        key, _ = mx.random.split(key)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step = mx.random.split(key)
        if top_p > 0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * (1 / temperature), key=step)

    return sample


def logits_processors_for(
    request: GenerateRequest, tokenizer: Any, eos: set[int], vocab_size: int, max_tokens: int
) -> list[LogitsProcessor]:
    """The request's own logits processors (each row has its own list, so they are batch-safe)."""
    bias = {int(token): value for token, value in (request.logit_bias or {}).items()}
    unknown = sorted(token for token in bias if token >= vocab_size)
    if unknown:
        raise InvalidRequest(
            f"logit_bias names token {unknown[0]}, beyond this model's vocabulary of {vocab_size}",
            param="logit_bias",
        )
    window = max_tokens  # OpenAI's penalties count all of the text generated so far
    processors: list[LogitsProcessor] = [ban_tokens(eos)] if request.ignore_eos else []
    processors += make_logits_processors(
        logit_bias=bias or None,
        repetition_penalty=request.repetition_penalty if request.repetition_penalty != 1.0 else None,
        presence_penalty=request.presence_penalty or None,
        presence_context_size=window,
        frequency_penalty=request.frequency_penalty or None,
        frequency_context_size=window,
    )
    schema = request.json_schema if request.json_schema is not None else request.forced_call_schema()
    if schema is not None:
        processors.append(JsonConstraint(tokenizer, schema))  # last: the mask has the final word
    return processors


def ban_tokens(token_ids: set[int]) -> Callable[[Any, Any], Any]:
    """A logits processor that makes the given tokens impossible to sample."""
    banned = mx.array(sorted(token_ids))

    def process(_tokens: Any, logits: Any) -> Any:
        logits[:, banned] = -float("inf")
        return logits

    return process


def thinking_budget(request: GenerateRequest, tokenizer: Any, split: OutputSplit) -> list[LogitsProcessor]:
    """With `reasoning_budget`: once the reasoning has taken that many tokens, its end marker is the
    only token left to sample, and the answer follows (a model whose end marker is one token)."""
    ends: list[int] = list(getattr(tokenizer, "think_end_tokens", None) or [])
    starts: list[int] = list(getattr(tokenizer, "think_start_tokens", None) or [])
    if request.reasoning_budget is None or split.markers.think is None or len(ends) != 1:
        return []
    start_id = int(starts[0]) if len(starts) == 1 else None
    return [ThinkingBudget(request.reasoning_budget, int(ends[0]), start_id, split.thinking)]


class ThinkingBudget:
    """The logits processor of `thinking_budget`: it counts the reasoning's tokens as they go by."""

    def __init__(self, budget: int, end_id: int, start_id: int | None, thinking: bool) -> None:
        self.budget, self.end_id, self.start_id = budget, end_id, start_id
        self.thinking = thinking
        self.spent = 0

    def advance(self, last: int | None) -> None:
        """One step, whose context ends with `last`."""
        if last == self.start_id:
            self.thinking = True  # the budget is for all of the reasoning, not each block
        elif last == self.end_id:
            self.thinking = False
        if self.thinking:
            self.spent += 1

    def __call__(self, context: Any, logits: Any) -> Any:
        self.advance(int(context[-1].item()) if context.size else None)
        if not self.thinking or self.spent <= self.budget:
            return logits
        forced = mx.full(logits.shape, -float("inf"), dtype=logits.dtype)
        forced[..., self.end_id] = 0.0
        return forced
