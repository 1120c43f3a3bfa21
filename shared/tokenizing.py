"""A model's tokenizer, chat template and context length from its files, without MLX.

The Rust `tokenizers` library reads the model's own `tokenizer.json`; the
context length comes from `config.json` unless the models file names one. The
gateway counts a request's prompt as the model sees it (the chat template
rendered by transformers, as mlx-lm renders it in the worker: system parts and
tool definitions included) before admitting; the worker sizes a batch's
synthesis prompt with it before generating.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.models import ModelSpec
from shared.schemas import GenerateRequest

logger = logging.getLogger(__name__)

RETRY_MISSING_S = 60.0
"""A model's files may appear later (the demo model is built by the worker): look again after this."""


@dataclass(frozen=True)
class ModelText:
    """What is known of a model's text handling: a tokenizer (None when its file is not here) and
    its context length in tokens (None when unknown)."""

    tokenizer: Any
    context: int | None
    directory: Path | None = None
    _chat: list[Any] = field(default_factory=list, compare=False)
    """transformers' tokenizer (for its chat template) once loaded: [] before, [None] when it cannot be."""
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False)
    _longest: list[int] = field(default_factory=list, compare=False)
    """The characters of the tokenizer's longest token, once looked for."""

    def prompt_tokens(self, request: GenerateRequest) -> int | None:
        """The request's prompt in tokens as the model sees it (chat template, system and tools
        included); None when the tokenizer or the template is not here to count with."""
        if self.tokenizer is None:
            return None
        if request.prompt is not None and self._chat_tokenizer() is None:
            return self.count(request.prompt)
        ids = self.prompt_ids(request)
        return None if ids is None else len(ids)

    def prompt_ids(self, request: GenerateRequest) -> list[int] | None:
        """The request's prompt as the model's token ids; None when they cannot be known here."""
        if self.tokenizer is None:
            return None
        # Encoded as the worker encodes it (worker/rows.py `encode_prompt`), by transformers' tokenizer: the
        # tokenizer file read alone can merge differently (a model's own settings) and adds no special tokens.
        chat = self._chat_tokenizer()
        if chat is None:
            return None
        if request.prompt is not None:
            return list(chat.encode(request.prompt))
        if getattr(chat, "chat_template", None) is None:
            return None
        messages, tools, kwargs = request.for_template()
        try:
            ids = chat.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, **kwargs)
        except Exception as exc:  # the template's own refusal (an unsupported role order, say)
            logger.info("cannot render the chat template of %s: %s", self.directory, type(exc).__name__)
            return None
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    @property
    def ready(self) -> bool:
        """Both its tokenizers are read: counting with them reads no file."""
        return self.tokenizer is not None and bool(self._chat) and self._chat[0] is not None

    def warm(self) -> None:
        if self.tokenizer is not None:
            self._chat_tokenizer()
            self.most_chars()

    def most_chars(self) -> int | None:
        """The most characters a prompt that fits the context can have: no token covers more than the
        tokenizer's longest one. None without a tokenizer or a known context."""
        if self.tokenizer is None or self.context is None:
            return None
        with self._lock:
            if not self._longest:
                self._longest.append(max((len(piece) for piece in self.tokenizer.get_vocab()), default=1))
        return self.context * self._longest[0]

    def _chat_tokenizer(self) -> Any:
        with self._lock:
            if not self._chat:
                self._chat.append(_load_chat_tokenizer(self.directory))
            return self._chat[0]

    def embedding_tokens(self, texts: list[str]) -> list[int] | None:
        """Tokens of each text as an embedding model encodes it (worker/embedding.py: transformers' tokenizer,
        its special tokens included), in one call; None when that tokenizer is not here."""
        chat = self._chat_tokenizer() if self.tokenizer is not None else None
        if chat is None or not texts:
            return None if chat is None else []
        return [len(ids) for ids in chat(texts, add_special_tokens=True)["input_ids"]]

    def count(self, text: str) -> int:
        """Tokens in `text`; without a tokenizer, its UTF-8 bytes (a token covers at least one)."""
        if self.tokenizer is None:
            return len(text.encode())
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def head(self, text: str, tokens: int) -> str:
        """The longest start of `text` that is at most `tokens` tokens."""
        if self.tokenizer is None:
            return text.encode()[:tokens].decode(errors="ignore")
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if tokens >= len(offsets):
            return text
        return text[: offsets[tokens][0]] if tokens > 0 else ""


class ModelTexts:
    """`ModelText` per model, read once (and again later while a model's files are missing)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, int | None], tuple[ModelText, float]] = {}

    def get(self, spec: ModelSpec) -> ModelText:
        # By where its files are and its context limit too: a name given another model (the live
        # registry) is read afresh.
        key = (spec.name, spec.source, spec.context_tokens)
        cached = self._cache.get(key)
        if cached is not None and (cached[0].tokenizer is not None or not self._may_have_appeared(spec, cached[1])):
            return cached[0]
        directory = spec.local_files()
        tokenizer = None
        context = spec.context_tokens
        if directory is not None:
            if context is None:
                context = context_length(directory / "config.json")
            if (directory / "tokenizer.json").is_file():
                from tokenizers import Tokenizer

                try:
                    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
                except Exception as exc:  # a broken file costs the token count, not the request
                    logger.warning("cannot read tokenizer of %s: %s", spec.name, exc)
        found = ModelText(tokenizer, context, directory)
        self._cache[key] = (found, time.monotonic())
        return found

    def ready(self, spec: ModelSpec) -> bool:
        """Whether `spec`'s text is read with both its tokenizers (`ModelText.ready`)."""
        cached = self._cache.get((spec.name, spec.source, spec.context_tokens))
        return cached is not None and cached[0].ready

    @staticmethod
    def _may_have_appeared(spec: ModelSpec, looked_at: float) -> bool:
        """A local model's tokenizer is looked for again once its file is there (a stat); a hub
        model's every RETRY_MISSING_S (the hub cache lookup costs more)."""
        if spec.path is not None:
            return (spec.path / "tokenizer.json").is_file()
        return time.monotonic() - looked_at >= RETRY_MISSING_S


def import_chat_library() -> None:
    """Import transformers (seconds, once per process) ahead of the first prompt to count."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" on every start
    try:
        import transformers  # noqa: F401
    except Exception as exc:
        logger.warning("cannot import transformers: prompts are counted without their chat template (%s)", exc)


def _load_chat_tokenizer(directory: Path | None) -> Any:
    if directory is None:
        return None
    import_chat_library()
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        logger.warning("cannot read the chat template of %s: %s", directory, type(exc).__name__)
        return None


def context_length(config_file: Path) -> int | None:
    """The context length a model's config.json gives, if any."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
