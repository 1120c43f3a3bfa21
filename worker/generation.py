"""One generation, token by token, with the checks that must run between tokens.

Cancellation and deadlines are looked at after every token: RQ's stop command is
a no-op for a SimpleWorker and no signal can interrupt a native MLX call, so the
loop itself is the only place a running generation can be stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from shared.errors import GenerationCanceled, InvalidRequest, JobTimedOut
from shared.schemas import FinishReason, GenerateRequest
from worker.stops import StopMatcher

TextSink = Callable[[str], None]
"""Receives each new piece of generated text as soon as it is safe to show."""

StopCheck = Callable[[], str | None]
"""Returns why the generation must stop now ("canceled" or "timeout"), or None to go on."""


@dataclass
class Outcome:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    generate_s: float
    first_token_s: float | None = None
    """From the start of this call (prompt encoding and prefill included) to the first token."""


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
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids)


def generate(
    model: Any,
    tokenizer: Any,
    request: GenerateRequest,
    max_tokens: int,
    should_stop: StopCheck,
    on_text: TextSink | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Outcome:
    """Run one generation to its end, a stop string, `max_tokens`, or a stop check."""
    started = time.perf_counter()
    prompt_ids = encode_prompt(tokenizer, request)
    if request.seed is not None:
        mx.random.seed(request.seed)
    eos = set(tokenizer.eos_token_ids)
    processors = [_ban_tokens(eos)] if request.ignore_eos else None
    sampler = make_sampler(temp=request.temperature, top_p=request.top_p if request.top_p < 1.0 else 0.0)
    matcher = StopMatcher(request.stop_list())
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    text = ""
    emitted = 0
    completion_tokens = 0
    finish: FinishReason = "length"
    cut: int | None = None
    first_token_at: float | None = None
    steps = generate_step(
        mx.array(prompt_ids),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_progress_callback=on_progress,
    )
    # Closed here, on the engine thread: generate_step holds an MLX stream context that
    # must not be torn down by the garbage collector on some other thread.
    with closing(steps):
        for token, _ in steps:
            token_id = int(token)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token_id in eos and not request.ignore_eos:
                finish = "stop"
                break
            completion_tokens += 1
            detokenizer.add_token(token_id)
            before = len(text)
            text += detokenizer.last_segment
            cut = matcher.find(text, before)
            if cut is not None:
                break
            reason = should_stop()
            if reason == "canceled":
                raise GenerationCanceled("The job was canceled while it was running")
            if reason == "timeout":
                raise JobTimedOut(f"The generation passed its deadline after {completion_tokens} tokens")
            if on_text is not None:
                safe = matcher.safe_length(text)
                if safe > emitted:
                    on_text(text[emitted:safe])
                    emitted = safe
    if cut is None:
        # Bytes of a multi-byte character may still sit in the detokenizer.
        before = len(text)
        detokenizer.finalize()
        text += detokenizer.last_segment
        cut = matcher.find(text, before)
    if cut is not None:
        text, finish = text[:cut], "stop"
    if on_text is not None and len(text) > emitted:
        on_text(text[emitted:])
    return Outcome(
        text=text,
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        completion_tokens=completion_tokens,
        generate_s=time.perf_counter() - started,
        first_token_s=None if first_token_at is None else first_token_at - started,
    )


def _ban_tokens(token_ids: set[int]) -> Callable[[Any, Any], Any]:
    """A logits processor that makes the given tokens impossible to sample."""
    banned = mx.array(sorted(token_ids))

    def process(_tokens: Any, logits: Any) -> Any:
        logits[:, banned] = -float("inf")
        return logits

    return process
