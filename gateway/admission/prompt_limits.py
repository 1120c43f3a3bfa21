"""Refuse a prompt that cannot fit, before it costs a queue slot, and resolve `max_tokens`.

A prompt with more characters than the model's context could hold is refused
before its tokens are counted (`MLXQ_MAX_PROMPT_CHARS`, or a model's
`max_prompt_chars`, sets a lower cap). Tokens are counted as the model sees them: the
chat template rendered with the model's own tokenizer (shared/tokenizing.py, no
MLX), system parts and tool definitions included, when its files are on this
machine (else the message text alone, a lower bound, and the worker checks again
once it has encoded the prompt). A prompt that cannot fit the model's context is
refused in OpenAI's words (`context_length_exceeded`, with the numbers), naming
what is too long; the other protocols' routes say it in theirs.

`max_tokens` is a ceiling, not a demand (OpenAI's, Anthropic's and Ollama's
clients send large ones: Claude Code asks for 32000): the generation may run to
the smallest of what was asked, `MLXQ_MAX_TOKENS_CAP` and what the context leaves
after the prompt. Without one it runs to that limit (`MLXQ_DEFAULT_MAX_TOKENS`
lowers it). This is the one place `max_tokens` is resolved; the job carries it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from shared.embeddings import DEFAULT_MAX_TOKENS, EmbedRequest, input_field, too_long
from shared.errors import ContextLengthExceeded, InvalidRequest, ModelFilesMissing
from shared.models import ModelRegistry, ModelSpec, kind_of
from shared.prefix_blocks import job_routes
from shared.schemas import GenerateRequest
from shared.settings import Settings
from shared.tokenizing import ModelText, ModelTexts, import_chat_library

logger = logging.getLogger(__name__)

UNKNOWN_CONTEXT_CHARS = 1_000_000
"""The most characters of a prompt for a model whose context or tokenizer is not known here."""

QUICK_CHARS = 8_000
"""Text whose check (a chat template rendered, its tokens counted) is quick enough for the event loop itself:
a millisecond or two. A longer one is checked on a thread; so was every one, and the hop cost more than the
check it moved for a burst of short requests (each waits for the GIL beside the others): 8 short chats at once
reached the queue 5-10 ms later than checked in place. Embedding inputs stay on a thread: a flood of them
checked in place would tokenize back to back on the event loop, between running streams' tokens (the stall of
`scripts/bench --embeddings` was 12.5 gaps in place against 9.2, one run each, within that shape's spread of 7
to 14 across runs: not settled either way)."""


@dataclass(frozen=True)
class Fitted:
    """A request that fits, with its `max_tokens` resolved."""

    request: GenerateRequest
    prompt_tokens: int
    """Its prompt in tokens as the model sees it when `exact`, else a lower bound (the message text)."""
    exact: bool
    routes: tuple[str, ...] = ()
    """The routing names of its prompt's whole blocks, deepest first (shared/prefix_blocks.py): the worker
    that holds its start takes it first (claim.lua)."""

    @property
    def max_tokens(self) -> int:
        assert self.request.max_tokens is not None
        return self.request.max_tokens


class PromptLimits:
    def __init__(self, models: ModelRegistry, settings: Settings) -> None:
        self._models = models
        self._settings = settings
        self._texts = ModelTexts()

    def warm(self) -> None:
        """Read every local model's tokenizer and chat template now (transformers' import alone takes
        seconds), so that no request waits for it; a model whose files come later loads fast then."""
        import_chat_library()
        for spec in self._models.all():
            if spec.path is not None and spec.problem() is None:
                self._texts.get(spec).warm()

    def quick(self, models: Iterable[str], chars: int) -> bool:
        """Whether checking `chars` characters for these models reads no file and writes nothing (their
        tokenizers read, no pull to start) and takes a millisecond or two (QUICK_CHARS)."""
        if chars > QUICK_CHARS:
            return False
        for name in models:
            spec = self._models.find(name)
            if spec is None or spec.repo is not None and spec.local_files() is None or not self._texts.ready(spec):
                return False
        return True

    def check(self, request: GenerateRequest) -> Fitted:
        """The request with its `max_tokens` resolved, if it fits; raises `ModelNotFound`,
        `ModelFilesMissing` or `InvalidRequest`."""
        spec = self._models.get(request.model)
        problem = spec.problem()
        if problem is not None:
            # It would only be queued to fail: say so now, for good (a retry cannot help).
            raise ModelFilesMissing(f"Model '{spec.name}' cannot be loaded: {problem}", param="model")
        if kind_of(spec) == "embed":
            raise InvalidRequest(
                f"Model '{spec.name}' is an embedding model: it answers /v1/embeddings, /api/embed and /v1/rerank,"
                " not a generation",
                param="model",
            )
        settings = self._settings
        if spec.chat_template_kwargs:
            # The model's defaults, under what the request says.
            kwargs = {**dict(spec.chat_template_kwargs), **(request.chat_template_kwargs or {})}
            request = request.model_copy(update={"chat_template_kwargs": kwargs})
        unset = {name: value for name, value in spec.defaults if name not in request.model_fields_set}
        if unset:  # the model's sampling defaults, for what the request leaves out
            request = request.model_copy(update=unset)
        field = "prompt" if request.prompt is not None else "messages"
        model_text = self._texts.get(spec)
        chars = request.prompt_chars()
        char_limit = spec.max_prompt_chars or settings.max_prompt_chars
        if char_limit is not None and chars > char_limit:
            raise InvalidRequest(f"The prompt has {chars} characters; the limit is {char_limit}", param=field)
        self._check_chars(model_text, chars, field)

        ids = model_text.prompt_ids(request)
        rendered = len(ids) if ids is not None else model_text.prompt_tokens(request)
        counted = rendered if rendered is not None else self._lower_bound(model_text, request)
        limit = settings.max_tokens_cap
        if model_text.context is not None:
            if counted >= model_text.context:
                raise self._too_long(spec, model_text, request, counted, exact=rendered is not None)
            limit = min(limit, model_text.context - counted)
        wanted = request.max_tokens or settings.default_max_tokens or limit
        # An alias is resolved here too: the job names the model itself (model affinity, /api/ps).
        resolved = request.model_copy(update={"max_tokens": min(wanted, limit), "model": spec.name})
        routes = tuple(job_routes(spec.name, ids)) if ids is not None else ()
        return Fitted(resolved, counted, exact=rendered is not None, routes=routes)

    def check_embedding(self, request: EmbedRequest) -> EmbedRequest:
        """An embedding or rerank request for an embedding model, its model's name resolved; an input
        past the model's limit refused when the request does not allow cutting it (every protocol's
        answer but Ollama's, whose `truncate` is true by default). Raises `ModelNotFound`,
        `ModelFilesMissing` or `InvalidRequest`, naming the field."""
        spec = self._models.get(request.model)
        problem = spec.problem()
        if problem is not None:
            raise ModelFilesMissing(f"Model '{spec.name}' cannot be loaded: {problem}", param="model")
        kind = kind_of(spec)
        # A hub model whose files are not here yet says nothing of its kind: admitted, it starts its pull,
        # and the worker refuses it then if it generates text (worker/embedding_runs.py).
        known = spec.kind is not None or spec.local_files() is not None
        if known and kind != "embed" and not (kind == "rerank" and request.kind == "rerank"):
            wanted = "an embedding model or a reranker" if request.kind == "rerank" else "an embedding model"
            raise InvalidRequest(
                f"Model '{spec.name}' generates text; this takes {wanted}"
                ' (`kind = "embed"` or `"rerank"` in the models file, or files that say so)',
                param="model",
            )
        if request.query is not None and not request.query.strip():
            raise InvalidRequest("`query` is empty", param="query")
        model_text = self._texts.get(spec)
        vocabulary = model_text.tokenizer.get_vocab_size() if model_text.tokenizer is not None else None
        for index, item in enumerate(request.inputs):
            if isinstance(item, list) and vocabulary is not None and any(not 0 <= i < vocabulary for i in item):
                field = f"input[{index}]"
                raise InvalidRequest(
                    f"{field} holds token ids outside the vocabulary (0-{vocabulary - 1})", param=field
                )
        # Counted and worded as the worker's check (worker/embedding.py), which stands where this cannot: a
        # model whose files are not here yet says neither its limit nor its tokens.
        limit = model_text.context or (DEFAULT_MAX_TOKENS if model_text.tokenizer is not None else None)
        if kind == "embed" and not request.truncate and limit is not None:
            texts = request.texts()
            counted = iter(model_text.embedding_tokens([t for t in texts if isinstance(t, str)]) or ())
            for index, item in enumerate(texts):
                tokens = len(item) if isinstance(item, list) else next(counted, None)
                if tokens is not None and tokens > limit:
                    raise too_long(input_field(index, request.query is not None), tokens, limit)
        return request.model_copy(update={"model": spec.name})

    @staticmethod
    def _check_chars(model_text: ModelText, chars: int, field: str) -> None:
        """A prompt with more characters than the context could hold is refused before the time it takes
        to count its tokens: no token covers more characters than the tokenizer's longest."""
        most_chars = model_text.most_chars()
        if most_chars is None:
            if chars > UNKNOWN_CONTEXT_CHARS:
                raise InvalidRequest(
                    f"The prompt has {chars} characters; the limit is {UNKNOWN_CONTEXT_CHARS}", param=field
                )
            return
        if chars > most_chars:
            context = model_text.context or 1
            at_least = -(-chars // (most_chars // context))
            raise ContextLengthExceeded.of_prompt(at_least, context, param=field, exact=False)

    @staticmethod
    def _lower_bound(model_text: ModelText, request: GenerateRequest) -> int:
        text = request.prompt if request.prompt is not None else "\n".join(m.text() for m in request.messages or [])
        return model_text.count(text) if model_text.tokenizer is not None else 0

    @staticmethod
    def _too_long(
        spec: ModelSpec, model_text: ModelText, request: GenerateRequest, counted: int, exact: bool
    ) -> ContextLengthExceeded:
        """In OpenAI's words, with the share of the tool definitions when the messages alone would fit
        (`tools` is then the field to shorten)."""
        context = model_text.context or 0
        field = "prompt" if request.prompt is not None else "messages"
        if exact and request.offers_tools():
            bare = model_text.prompt_tokens(request.model_copy(update={"tools": None, "tool_choice": None}))
            if bare is not None:
                return ContextLengthExceeded.of_prompt(
                    counted, context, param="tools" if bare < context else field, tools_tokens=counted - bare
                )
        return ContextLengthExceeded.of_prompt(counted, context, param=field, exact=exact)
