"""One request inside a running batch: what it asks of the sampler, and its text as tokens arrive.

Everything per request lives here, never on the engine: its sampler (with its
own random key when it has a seed, so its output does not depend on which other
requests share the batch), its stop tokens and strings, its detokenizer and the
text shown so far. mlx-lm's BatchGenerator only sees token ids; stop strings
are matched on text (StopMatcher), since token-level matching misses a stop
string split differently across tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import StopSequences
from mlx_lm.sample_utils import apply_top_p, make_sampler

from shared.errors import InvalidRequest
from shared.schemas import FinishReason, GenerateRequest
from worker.stops import StopMatcher

Sampler = Callable[[mx.array], mx.array]

TextSink = Callable[[str], None]
"""Receives each new piece of generated text as soon as it is safe to show."""


@dataclass
class Outcome:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    generate_s: float
    first_token_s: float | None = None
    cached_tokens: int = 0
    """From the request joining the batch (prompt encoding and prefill included) to its first token."""

_SHARED: dict[tuple[float, float], Sampler] = {}
"""Unseeded samplers by (temperature, top_p): rows that share one are sampled in one batched call."""


def sampler_for(request: GenerateRequest) -> Sampler:
    """The request's sampler: shared by requests asking the same without a seed, its own with one."""
    top_p = request.top_p if request.top_p < 1.0 else 0.0
    if request.seed is None or request.temperature == 0:
        key = (request.temperature, top_p)
        if key not in _SHARED:
            _SHARED[key] = make_sampler(temp=request.temperature, top_p=top_p)
        return _SHARED[key]
    return _keyed(request.seed, request.temperature, top_p)


def _keyed(seed: int, temperature: float, top_p: float) -> Sampler:
    """A sampler with a random key of its own, split every step: the same seed gives the same text
    alone, in any batch, joining at any step (MLX's global seed is shared by every row)."""
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step = mx.random.split(key)
        if top_p > 0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=step)

    return sample


def encode_prompt(tokenizer: Any, request: GenerateRequest) -> list[int]:
    """Token ids for the request: the chat template for messages, plain encoding for a prompt."""
    if request.prompt is not None:
        ids: list[int] = tokenizer.encode(request.prompt)
        return ids
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequest(
            f"Model '{request.model}' has no chat template; send `prompt` instead of `messages`",
            param="messages",
        )
    messages = [{"role": m.role, "content": m.text()} for m in request.messages or []]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def ban_tokens(token_ids: set[int]) -> Callable[[Any, Any], Any]:
    """A logits processor that makes the given tokens impossible to sample."""
    banned = mx.array(sorted(token_ids))

    def process(_tokens: Any, logits: Any) -> Any:
        logits[:, banned] = -float("inf")
        return logits

    return process


@dataclass
class Row:
    """A request's state while it is in the batch."""

    request: GenerateRequest
    prompt_ids: list[int]
    eos: set[int]
    detokenizer: Any
    on_text: TextSink | None
    started: float = field(default_factory=time.perf_counter)
    text: str = ""
    emitted: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    cached_tokens: int = 0
    """Prompt tokens that came from a kept prefix's KV cache instead of being computed."""
    cut_by_stop_string: bool = False
    matcher: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.request.stop_list())
        self.detokenizer.reset()

    @classmethod
    def start(cls, tokenizer: Any, request: GenerateRequest, on_text: TextSink | None) -> Row:
        return cls(
            request=request,
            prompt_ids=encode_prompt(tokenizer, request),
            eos=set(tokenizer.eos_token_ids),
            detokenizer=tokenizer.detokenizer,
            on_text=on_text,
        )

    def batch_options(self) -> dict[str, Any]:
        """What BatchGenerator.insert takes for this request (one-element lists)."""
        ignore_eos = self.request.ignore_eos
        return {
            "samplers": [sampler_for(self.request)],
            "logits_processors": [[ban_tokens(self.eos)] if ignore_eos else []],
            "stop_sequences": [StopSequences(None if ignore_eos else [[t] for t in sorted(self.eos)])],
        }

    def take(self, token: int, finish_reason: str | None) -> FinishReason | None:
        """Add one generated token; why the request is done now, or None while it goes on."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos and not self.request.ignore_eos:
            return "stop"
        self.completion_tokens += 1
        self.detokenizer.add_token(token)
        before = len(self.text)
        self.text += self.detokenizer.last_segment
        cut = self.matcher.find(self.text, before)
        if cut is not None:
            self.text, self.cut_by_stop_string = self.text[:cut], True
            return "stop"
        if self.on_text is not None:
            safe = self.matcher.safe_length(self.text)
            if safe > self.emitted:
                self.on_text(self.text[self.emitted : safe])
                self.emitted = safe
        return "length" if finish_reason == "length" else None

    def outcome(self, finish: FinishReason) -> Outcome:
        """The request's result; the detokenizer's last bytes (a multi-byte character) are flushed first."""
        if not self.cut_by_stop_string:
            before = len(self.text)
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
            cut = self.matcher.find(self.text, before)
            if cut is not None:
                self.text, finish = self.text[:cut], "stop"
        if self.on_text is not None and len(self.text) > self.emitted:
            self.on_text(self.text[self.emitted :])
        return Outcome(
            text=self.text,
            finish_reason=finish,
            prompt_tokens=len(self.prompt_ids),
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            generate_s=time.perf_counter() - self.started,
            first_token_s=None if self.first_token_at is None else self.first_token_at - self.started,
        )
