"""Prompt prefixes already computed: KV caches kept under a byte budget, least recently used out first.

Two uses. The children of a fan-out share a long prefix (system prompt, task
context) and reach the engine within milliseconds of each other: the first is
prefilled, the others wait for it and start from a copy of its cache cut to
the shared length, so the prefix is computed once. And a later request that
starts like an earlier one (the next turn of a chat, a repeated system prompt)
starts from the cache the earlier one left.

mlx-lm's LRUPromptCache holds the caches (a token trie per model, byte budget,
copies handed out, longer entries trimmed to a shared prefix). The code asks each
cache what it can do rather than listing types: a cache that can be trimmed
(plain KV) is cut at any token; one that cannot (a sliding window that has
wrapped, the recurrent state of a gated delta net or a Mamba layer) is kept at
exactly the tokens it holds, and serves only prompts that extend them. The batch
runner keeps such states where a later prompt extends them: the end of the
system messages, the end of the prompt and the end of the generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache

from worker.cache_shape import compact, copied, layers, nbytes, trim

MIN_REUSED_TOKENS = 8
"""A kept prefix this long is worth its copy: copying it is a slice of memory, computing it a pass over
all of the model's weights (a chat template's opening alone is about 20 tokens). Waiting for a member to
compute a shared prefix is another matter (worker/scheduler.py's MIN_SHARED_TOKENS)."""


class Prefixes:
    """KV caches of prompt prefixes for every model, under one byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lru = LRUPromptCache(max_size=1 << 16, max_bytes=max(0, budget_bytes))

    @property
    def nbytes(self) -> int:
        return int(self._lru.nbytes)

    def nearest(self, model: str, ids: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A copy of the cache of the longest kept prefix of `ids` and its length (None, 0 when
        nothing worth reusing is kept). At least the last token is left to compute: generation
        starts from its logits."""
        if self.budget_bytes <= 0 or len(ids) <= MIN_REUSED_TOKENS:
            return None, 0
        ids = list(ids)
        cache, rest = self._lru.fetch_nearest_cache(model, ids)
        if cache is not None and not rest:
            # All of it is kept: a cache that can be trimmed gives back its last token; one that cannot
            # serves from a shorter state (the end of the prompt's prefill keeps one).
            if can_trim_prompt_cache(cache):
                trim(cache, 1)  # the trie's copy: ours to cut
                rest = ids[-1:]
            else:
                cache, rest = self._lru.fetch_nearest_cache(model, ids[:-1])
                rest = [*rest, ids[-1]]
        reused = len(ids) - len(rest)
        if cache is None or reused < MIN_REUSED_TOKENS:
            return None, 0
        for layer in layers(cache):
            compact(layer)  # a longer entry the trie cut to the shared part holds all of its buffer
        return cache, reused

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def keep(self, model: str, ids: Sequence[int], cache: Sequence[Any], held: int) -> bool:
        """Keep a copy of the first `len(ids)` positions of `cache`, which holds `held` tokens
        beginning with `ids`; older entries go past the budget. False when it is not kept (too short,
        too big, or a cache that cannot be cut there)."""
        if not self.enabled or len(ids) < MIN_REUSED_TOKENS:
            return False
        kept = copied(cache, held, len(ids))
        if kept is None or nbytes(kept) > self.budget_bytes:
            return False
        self._lru.insert_cache(model, list(ids), kept)
        return True

    def shrink_to(self, budget_bytes: int) -> None:
        self._lru.trim_to(n_bytes=max(0, budget_bytes))

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)
