"""Prompt prefixes already computed: KV caches kept under a byte budget, least recently used out first.

Two uses. The children of a fan-out share a long prefix (system prompt, task
context) and reach the engine within milliseconds of each other: the first is
prefilled, the others wait for it and start from a copy of its cache cut to
the shared length, so the prefix is computed once. And a later request that
starts like an earlier one (the next turn of a chat, a repeated system prompt)
starts from the cache the earlier one left.

mlx-lm's LRUPromptCache holds the caches (a token trie per model, byte budget,
copies handed out, longer entries trimmed to a shared prefix). Only plain
`KVCache` layers are shared: a rotating window or a recurrent state cannot be cut
at an arbitrary token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, LRUPromptCache

MIN_REUSED_TOKENS = 8
"""A kept prefix this long is worth its copy: copying it is a slice of memory, computing it a pass over
all of the model's weights (a chat template's opening alone is about 20 tokens). Waiting for a member to
compute a shared prefix is another matter (worker/scheduler.py's MIN_SHARED_TOKENS)."""


def shareable(cache: Sequence[Any]) -> bool:
    return bool(cache) and all(type(layer) is KVCache for layer in cache)


def cut(cache: Sequence[Any], tokens: int) -> list[Any]:
    """A new cache holding the first `tokens` positions of `cache` (copied, so the source may go)."""
    layers = []
    for layer in cache:
        fresh = KVCache()  # type: ignore[no-untyped-call]
        # contiguous: a copy, not a view that would keep the whole batch's buffer alive
        fresh.keys = mx.contiguous(layer.keys[..., :tokens, :])
        fresh.values = mx.contiguous(layer.values[..., :tokens, :])
        fresh.offset = tokens
        layers.append(fresh)
    mx.eval([(layer.keys, layer.values) for layer in layers])
    return layers


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
        starts from it."""
        if self.budget_bytes <= 0 or len(ids) <= MIN_REUSED_TOKENS:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(model, list(ids))
        reused = len(ids) - len(rest)
        if cache is None or reused < MIN_REUSED_TOKENS:
            return None, 0
        if reused == len(ids):
            reused -= 1  # the last token is computed: generation starts from its logits
        # A copy of exactly `reused` positions: a longer entry's copy would hold all of its buffer.
        return cut(cache, reused), reused

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def keep(self, model: str, ids: Sequence[int], cache: Sequence[Any]) -> bool:
        """Keep a copy of the first `len(ids)` positions of `cache`, which holds the tokens `ids`
        (and maybe more); older entries go past the budget. False when it is not kept."""
        if not self.enabled or len(ids) < MIN_REUSED_TOKENS or not shareable(cache):
            return False
        if cache[0].offset < len(ids):
            return False
        copy = cut(cache, len(ids))
        if sum(layer.nbytes for layer in copy) > self.budget_bytes:
            return False
        self._lru.insert_cache(model, list(ids), copy)
        return True

    def shrink_to(self, budget_bytes: int) -> None:
        self._lru.trim_to(n_bytes=max(0, budget_bytes))

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)
