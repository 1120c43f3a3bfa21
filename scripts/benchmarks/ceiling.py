"""The engine's own ceiling: mlx-lm's `batch_generate` in the bench's process, no HTTP and no queue.

The decode step all three servers run is mlx-lm's BatchGenerator; this is what it
makes of the same prompts at the same batch size with nothing around it, so a
server's throughput over it is the share its serving path keeps.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path
from typing import Any


@cache
def _loaded(model_dir: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))[:2]
    return model, tokenizer


def ceiling_tok_s(model_dir: Path, prompts: list[list[dict[str, str]]], max_tokens: int, batch: int) -> float:
    """Tokens a second `batch_generate` makes of these chats, `batch` decoding at once (8 prefilled
    together, as mlx-lm's server does)."""
    from mlx_lm.generate import batch_generate

    model, tokenizer = _loaded(model_dir)
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in prompts]
    started = time.perf_counter()
    done = batch_generate(
        model, tokenizer, ids, max_tokens=max_tokens, completion_batch_size=batch, prefill_batch_size=min(8, batch)
    )
    return float(done.stats.generation_tokens) / (time.perf_counter() - started)
