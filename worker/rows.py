"""One request inside a running batch: what it asks of the sampler, and its text as tokens arrive.

Everything per request lives here, never on the engine: its sampler and logits
processors (worker/sampling.py), its stop tokens and strings, its detokenizer,
the text shown so far, and what it has streamed (a job carried on after a crash
resumes from that). mlx-lm's BatchGenerator only sees token ids; stop strings
are matched on text (StopMatcher), since token-level matching misses a stop
string split differently across tokens.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.generate import StopSequences

from shared.errors import InvalidRequest
from shared.job_stream import Resumed
from shared.schemas import FinishReason, GenerateRequest, NamedToolChoice
from worker import harmony
from worker.logprobs import entry as token_logprobs
from worker.output_split import Markers, OutputSplit, Piece
from worker.sampling import LogitsProcessor, logits_processors_for, sampler_for, thinking_budget
from worker.stops import StopMatcher


@dataclass(frozen=True)
class Sent:
    """A piece of output as its job's stream holds it (shared/job_stream.py)."""

    piece: Piece
    seq: int
    """1 for the job's first piece, one more for each after, across attempts."""
    tokens: list[int]
    """The token ids generated since the piece before: an attempt after a crash carries on from them."""
    logprobs: list[dict[str, Any]] | None = None
    """With `logprobs`: the entries of those tokens."""
    final: FinishReason | None = None
    """On the last piece of a generation that ended: how."""


class TextSink(Protocol):
    """Receives each new piece of output (text, reasoning, a call's start or more of its arguments)
    as soon as it is safe to show."""

    def __call__(self, sent: Sent, /) -> None: ...


@dataclass
class Outcome:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    generate_s: float
    first_token_s: float | None = None
    first_token_at: float | None = None
    """When the first token was made (time.time())."""
    cached_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: str | None = None
    """The model's reasoning, apart from `text` (its answer)."""
    stop_sequence: str | None = None
    """The stop string that ended the text, if one did."""


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
    messages, tools, kwargs = request.for_template()
    return list(
        tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, **kwargs)
    )


@dataclass
class Row:
    """A request's state while it is in the batch."""

    request: GenerateRequest
    prompt_ids: list[int]
    eos: set[int]
    detokenizer: Any
    on_text: TextSink | None
    processors: list[LogitsProcessor] = field(default_factory=list)
    vocab_size: int = 1 << 30
    tokenizer: Any = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    """With `logprobs`: one entry per generated token."""
    unsent: int = 0
    """Entries of `logprobs` not yet handed to `on_text` with a piece."""
    started: float = field(default_factory=time.perf_counter)
    text: str = ""
    emitted: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    first_token_wall: float | None = None
    cached_tokens: int = 0
    """Prompt tokens that came from a kept prefix's KV cache instead of being computed."""
    cut_by_stop_string: bool = False
    stop_sequence: str | None = None
    split: OutputSplit = field(default_factory=lambda: OutputSplit(Markers()))
    """The output as reasoning, text and calls, as it is generated."""
    seq: int = 0
    """The last piece's number (shared/job_stream.py)."""
    unsent_tokens: list[int] = field(default_factory=list)
    """Tokens taken since the last piece went out: they go with the next one."""
    resumed_tokens: list[int] = field(default_factory=list)
    """Tokens an earlier attempt generated (`resume`): the batch prefills them after the prompt."""
    muted_until: int = 0
    """Pieces up to this number are already in the stream: a resumed row makes them again unsent."""
    unshown: frozenset[int] = frozenset()
    """Special tokens that are not the model's markers: counted, never in the text (OpenAI's
    `skip_special_tokens`)."""
    ended_before: FinishReason | None = None
    """A resumed row whose earlier attempt had already ended: it ends so again, generating nothing."""
    matcher: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.request.stop_list())
        self.detokenizer.reset()

    @classmethod
    def start(
        cls,
        tokenizer: Any,
        request: GenerateRequest,
        max_tokens: int,
        on_text: TextSink | None,
        reasoning: tuple[str, str] | bool | None = None,
    ) -> Row:
        """The row of `request`; `reasoning` is its model's setting (models.toml), None: as the tokenizer says."""
        eos = set(tokenizer.eos_token_ids)
        vocab_size, markers = vocabulary_facts(tokenizer)
        prompt_ids = encode_prompt(tokenizer, request)
        if reasoning is not None:
            markers = replace(markers, think=reasoning if isinstance(reasoning, tuple) else None)
        forced = request.forced_call_schema() is not None
        if request.prompt is not None or forced or request.json_schema is not None:
            # Raw text has no template to think in; constrained output is the JSON from its first token.
            markers = replace(markers, think=None)
        split = OutputSplit(
            markers,
            thinking=markers.think is not None and opens_thinking(tokenizer, prompt_ids, markers.think[0]),
            forced=forced,
            forced_name=request.tool_choice.function.name if isinstance(request.tool_choice, NamedToolChoice) else "",
            max_calls=1_000_000 if request.parallel_tool_calls else 1,
            tools=request.template_tools(),
        )
        return cls(
            request=request,
            prompt_ids=prompt_ids,
            split=split,
            eos=eos,
            detokenizer=tokenizer.detokenizer,
            on_text=on_text,
            processors=logits_processors_for(request, tokenizer, eos, vocab_size, max_tokens)
            + thinking_budget(request, tokenizer, split),
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            unshown=unshown_specials(tokenizer, markers),
        )

    @property
    def context_ids(self) -> list[int]:
        """What the batch prefills: the prompt, then what an earlier attempt generated."""
        return self.prompt_ids + self.resumed_tokens

    def resume(self, done: Resumed) -> None:
        """Carry on from an earlier attempt: its tokens are taken again as if just generated, so the
        text, the split and the stop matcher stand where they stood, and the pieces they make again
        are not sent twice. Processors that keep a state (`advance`) are walked through the same
        steps, each seeing the context it saw then."""
        self.logprobs = list(done.logprobs)
        self.muted_until = done.seq
        self.split.keep_ids(done.call_ids)
        for token in done.tokens:
            ended = self.take(token, None)
            if ended is not None:  # a stop string it had met: its last pieces had gone out
                self.ended_before = ended
                break
        if done.finished is not None and self.ended_before is None:
            self.ended_before = "length" if done.finished == "length" else "stop"
        self.resumed_tokens = list(done.tokens)
        self.first_token_at = self.first_token_wall = None
        steps = [self.prompt_ids[-1], *done.tokens[:-1]] if done.tokens else []
        for processor in self.processors:
            advance = getattr(processor, "advance", None)
            if advance is not None:
                for last in steps:
                    advance(last)

    def batch_options(self) -> dict[str, Any]:
        """What BatchGenerator.insert takes for this request (one-element lists)."""
        ignore_eos = self.request.ignore_eos
        return {
            "samplers": [sampler_for(self.request, self.vocab_size, skip=len(self.resumed_tokens))],
            "logits_processors": [self.processors],
            "stop_sequences": [StopSequences(None if ignore_eos else [[t] for t in sorted(self.eos)])],
        }

    def take(self, token: int, finish_reason: str | None, logprobs: mx.array | None = None) -> FinishReason | None:
        """Add one generated token; why the request is done now, or None while it goes on."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.first_token_wall = time.time()
        if token in self.eos and not self.request.ignore_eos:
            return "stop"
        self.completion_tokens += 1
        self.unsent_tokens.append(token)
        if self.request.logprobs and logprobs is not None:
            self.logprobs.append(token_logprobs(self.tokenizer, token, logprobs, self.request.top_logprobs))
        if token in self.unshown:
            return "length" if finish_reason == "length" else None
        self.detokenizer.add_token(token)
        before = len(self.text)
        self.text += self.detokenizer.last_segment
        cut = self.matcher.find(self.text, before)
        if cut is not None:
            self._cut_at_stop(cut)
            return "stop"
        safe = self.matcher.safe_length(self.text)
        if safe > self.emitted:
            self._send(self.split.feed(self.text[self.emitted : safe]))
            self.emitted = safe
        return "length" if finish_reason == "length" else None

    def _cut_at_stop(self, cut: int) -> None:
        self.stop_sequence = next((s for s in self.matcher.stops if self.text.startswith(s, cut)), None)
        self.text, self.cut_by_stop_string = self.text[:cut], True

    def _send(self, pieces: list[Piece], final: FinishReason | None = None) -> None:
        for n, piece in enumerate(pieces, 1):
            self.seq += 1
            tokens, self.unsent_tokens = self.unsent_tokens, []
            logprobs = None
            if self.request.logprobs:
                logprobs, self.unsent = self.logprobs[self.unsent :], len(self.logprobs)
            if self.on_text is not None and self.seq > self.muted_until:
                self.on_text(Sent(piece, self.seq, tokens, logprobs, final if n == len(pieces) else None))

    def outcome(self, finish: FinishReason) -> Outcome:
        """The request's result; the detokenizer's last bytes (a multi-byte character) are flushed first."""
        if not self.cut_by_stop_string:
            before = len(self.text)
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
            cut = self.matcher.find(self.text, before)
            if cut is not None:
                self._cut_at_stop(cut)
                finish = "stop"
        pieces = self.split.feed(self.text[self.emitted :]) + self.split.finish(cut=finish == "length")
        self.emitted = len(self.text)
        if self.request.logprobs and self.unsent < len(self.logprobs) and not pieces:
            pieces = [Piece("text")]  # the last tokens' logprobs, with no text of their own
        self._send(pieces, final=finish)
        calls = self.split.calls
        if calls and finish == "stop":
            finish = "tool_calls"
        return Outcome(
            text=self.split.content,
            tool_calls=calls or None,
            reasoning=self.split.reasoning or None,
            stop_sequence=self.stop_sequence,
            finish_reason=finish,
            prompt_tokens=len(self.prompt_ids),
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            generate_s=time.perf_counter() - self.started,
            first_token_s=None if self.first_token_at is None else self.first_token_at - self.started,
            first_token_at=self.first_token_wall,
            logprobs=self.logprobs if self.request.logprobs else None,
        )


DEFAULT_CALL_MARKERS = ("<tool_call>", "</tool_call>")
"""Hermes- and Qwen-style calls (the demo model's too), where mlx-lm names no markers of its own."""


def markers_of(tokenizer: Any, vocab: dict[str, int]) -> Markers:
    """The model's reasoning and tool-call markers, as mlx-lm reads them from its tokenizer and template
    (gpt-oss's harmony, which mlx-lm does not read, as worker/harmony.py does)."""
    if harmony.speaks_harmony(vocab):
        return harmony.MARKERS
    think = None
    if getattr(tokenizer, "has_thinking", False) and tokenizer.think_start and tokenizer.think_end:
        think = (str(tokenizer.think_start), str(tokenizer.think_end))
    start = getattr(tokenizer, "tool_call_start", None)
    end = getattr(tokenizer, "tool_call_end", None)
    parser = getattr(tokenizer, "tool_parser", None)
    if not start:
        return Markers(think=think, call=DEFAULT_CALL_MARKERS)
    if getattr(parser, "__module__", "").endswith(".json_tools"):
        parser = None  # JSON between the markers: streamed as it forms, by our own reading
    return Markers(think=think, call=(str(start), str(end or "")), parser=parser)


_vocabularies: weakref.WeakKeyDictionary[Any, tuple[int, Markers]] = weakref.WeakKeyDictionary()


def vocabulary_facts(tokenizer: Any) -> tuple[int, Markers]:
    """The tokenizer's vocabulary size and its model's markers, once per tokenizer: building the vocabulary's
    dict takes tens of milliseconds for a 150k-entry one, on the engine thread, in the way of every row."""
    known = _vocabularies.get(tokenizer)
    if known is None:
        vocab = tokenizer.get_vocab()
        known = (len(vocab), markers_of(tokenizer, vocab))
        _remember(_vocabularies, tokenizer, known)
    return known


def _remember(cache: weakref.WeakKeyDictionary[Any, Any], tokenizer: Any, value: Any) -> None:
    try:
        cache[tokenizer] = value
    except TypeError:  # a tokenizer that cannot be referred to weakly is looked at again each time
        pass


_unshown: weakref.WeakKeyDictionary[Any, tuple[Markers, frozenset[int]]] = weakref.WeakKeyDictionary()


def unshown_specials(tokenizer: Any, markers: Markers) -> frozenset[int]:
    """The tokenizer's special tokens (`<|endoftext|>`, `<|im_start|>`) that no marker of the model's
    holds: servers leave them out of the text by default. gpt-oss's are its channels' structure, all
    read by its split (worker/harmony.py). Once per tokenizer and markers."""
    known = _unshown.get(tokenizer)
    if known is not None and known[0] == markers:
        return known[1]
    if markers is harmony.MARKERS:
        found: frozenset[int] = frozenset()
    else:
        wrapped = getattr(tokenizer, "_tokenizer", tokenizer)
        added = getattr(wrapped, "added_tokens_decoder", {}) or {}
        texts = [t for pair in (markers.think, markers.call) if pair for t in pair] + list(markers.dropped)
        found = frozenset(
            int(token_id)
            for token_id, token in added.items()
            if getattr(token, "special", False) and not any(str(token.content) in text for text in texts)
        )
    _remember(_unshown, tokenizer, (markers, found))
    return found


def opens_thinking(tokenizer: Any, prompt_ids: list[int], start: str) -> bool:
    """Whether the chat template opened the reasoning in the prompt (Qwen3, DeepSeek-R1 style): the
    prompt's text ends with the start marker, and the generation starts inside it."""
    return str(tokenizer.decode(prompt_ids[-8:])).rstrip().endswith(start)
