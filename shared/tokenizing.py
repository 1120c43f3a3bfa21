"""A model's tokenizer and context length from its files, without MLX.

The Rust `tokenizers` library reads the model's own `tokenizer.json`; the
context length comes from `config.json` unless the models file names one. The
gateway counts prompt tokens with it before admitting; the worker sizes a
batch's synthesis prompt with it before generating.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.models import ModelSpec

logger = logging.getLogger(__name__)

RETRY_MISSING_S = 60.0
"""A model's files may appear later (the demo model is built by the worker): look again after this."""


@dataclass(frozen=True)
class ModelText:
    """What is known of a model's text handling: a tokenizer (None when its file is not here) and
    its context length in tokens (None when unknown)."""

    tokenizer: Any
    context: int | None

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
        self._cache: dict[str, tuple[ModelText, float]] = {}

    def get(self, spec: ModelSpec) -> ModelText:
        cached = self._cache.get(spec.name)
        if cached is not None and (cached[0].tokenizer is not None or time.monotonic() - cached[1] < RETRY_MISSING_S):
            return cached[0]
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
                except Exception as exc:  # a broken file costs the token count, not the request
                    logger.warning("cannot read tokenizer of %s: %s", spec.name, exc)
        found = ModelText(tokenizer, context)
        self._cache[spec.name] = (found, time.monotonic())
        return found


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
