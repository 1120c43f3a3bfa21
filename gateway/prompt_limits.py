"""Refuse a prompt or `max_tokens` that cannot fit, before it costs a queue slot.

Characters are always checked. Tokens are checked with the model's own
`tokenizer.json` (the Rust `tokenizers` library, no MLX) when it is on this
machine, and only when the text is long enough to possibly not fit: a token
covers at least one UTF-8 byte, so a prompt of fewer bytes than the budget never
needs tokenizing. Counts leave out the chat template's few tokens, so nothing
that fits is refused.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from shared.errors import InvalidRequest
from shared.models import ModelRegistry, ModelSpec
from shared.schemas import GenerateRequest
from shared.settings import Settings

logger = logging.getLogger(__name__)

RETRY_MISSING_S = 60.0
"""A model's files may appear later (the demo model is built by the worker): look again after this."""


class PromptLimits:
    def __init__(self, models: ModelRegistry, settings: Settings) -> None:
        self._models = models
        self._settings = settings
        self._tokenizers: dict[str, tuple[Any, int | None, float]] = {}

    def check(self, request: GenerateRequest) -> ModelSpec:
        """The model's spec if the request fits; raises `ModelNotFound` or `InvalidRequest`."""
        spec = self._models.get(request.model)
        settings = self._settings
        field = "prompt" if request.prompt is not None else "messages"
        if request.max_tokens is not None and request.max_tokens > settings.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens is {request.max_tokens}; the limit here is {settings.max_tokens_cap}",
                param="max_tokens",
            )
        char_limit = spec.max_prompt_chars or settings.max_prompt_chars
        chars = request.prompt_chars()
        if chars > char_limit:
            raise InvalidRequest(f"The prompt has {chars} characters; the limit is {char_limit}", param=field)

        tokenizer, context = self._tokenizer(spec)
        if context is None:
            return spec
        budget = request.max_tokens or settings.default_max_tokens
        text = request.prompt if request.prompt is not None else "\n".join(m.text() for m in request.messages or [])
        if tokenizer is None or len(text.encode()) + budget <= context:
            return spec
        prompt_tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
        if prompt_tokens >= context:
            raise InvalidRequest(
                f"The prompt has at least {prompt_tokens} tokens; model '{spec.name}' takes {context} in all",
                param=field,
            )
        if prompt_tokens + budget > context:
            raise InvalidRequest(
                f"Model '{spec.name}' has a context of {context} tokens; the prompt takes at least "
                f"{prompt_tokens}, so max_tokens can be at most {context - prompt_tokens}, not {budget}",
                param="max_tokens",
            )
        return spec

    def _tokenizer(self, spec: ModelSpec) -> tuple[Any, int | None]:
        cached = self._tokenizers.get(spec.name)
        if cached is not None and (cached[0] is not None or time.monotonic() - cached[2] < RETRY_MISSING_S):
            return cached[0], cached[1]
        directory = spec.local_files()
        tokenizer = None
        context = spec.context_tokens
        if directory is not None:
            if context is None:
                context = _context_length(directory / "config.json")
            if (directory / "tokenizer.json").is_file():
                from tokenizers import Tokenizer

                try:
                    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
                except Exception as exc:  # a broken file costs the token check, not the request
                    logger.warning("cannot read tokenizer of %s: %s", spec.name, exc)
        self._tokenizers[spec.name] = (tokenizer, context, time.monotonic())
        return tokenizer, context


def _context_length(config_file: Path) -> int | None:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
