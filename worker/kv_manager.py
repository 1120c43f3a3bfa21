"""The KV cache manager: the one owner of every cached byte outside the running batch.

Two uses of kept caches. The children of a fan-out share a long prefix (system
prompt, task context) and reach the engine within milliseconds of each other:
the first is prefilled, the others wait for it and start from a copy of its
cache cut to the shared length, so the prefix is computed once. And a later
request that starts like an earlier one (the next turn of a chat, a repeated
system prompt) starts from the cache the earlier one left.

What it decides and keeps: the nearest kept prefix of a prompt (`seed`), a
member's cache copied for others (`keep_copy`), a finished row's cache for the
next turn (`finished`), the state of a cache that cannot be cut where later
prompts extend it (`segments` says where: the end of the system messages;
`state_reached` keeps it), and giving bytes back under the ledger's budget
(`shrink_to`, `clear`). The batch runner only copies bytes in and out of the
generator; the scheduler decides who shares with whom.

Behind memory, a disk tier (worker/prefix_disk.py) keeps what was kept past the
process: every copy kept in memory is written there too, off the engine thread,
and a prompt whose start the disk holds further than memory does is read back
(a new worker after a crash, a model loaded again, a session that left memory).

mlx-lm's LRUPromptCache holds the caches (a token trie per model, byte budget,
copies handed out, longer entries trimmed to a shared prefix). The code asks each
cache what it can do rather than listing types: a cache that can be trimmed
(plain KV) is cut at any token; one that cannot (a sliding window that has
wrapped, the recurrent state of a gated delta net or a Mamba layer) is kept at
exactly the tokens it holds, and serves only prompts that extend them.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache

from shared.prefix_blocks import routes
from worker.cache_shape import compact, copied, layers, nbytes, trim
from worker.prefix_disk import PrefixDisk
from worker.rows import Row
from worker.scheduler import shared_length

logger = logging.getLogger(__name__)

MIN_REUSED_TOKENS = 8
"""A kept prefix this long is worth its copy: copying it is a slice of memory, computing it a pass over
all of the model's weights (a chat template's opening alone is about 20 tokens). Waiting for a member to
compute a shared prefix is another matter (worker/scheduler.py's MIN_SHARED_TOKENS)."""

KEPT_SEGMENT_TOKENS = 128
"""The system messages are a segment of their own (their state kept where a cache cannot be cut) from this
long: shorter ones cost less to compute again than to keep."""

HELD_ROUTES = 100_000
"""Routing names a worker publishes at most (about 3 MB in Redis): past it, it starts over."""

OPENINGS_KEPT = 64
"""System openings remembered per worker: a few kilobytes of token ids each."""


@dataclass
class Hits:
    """Prompts that started from a kept prefix, by tier, and the tokens those prefixes held."""

    lookups: int = 0
    memory: int = 0
    memory_tokens: int = 0
    disk: int = 0
    disk_tokens: int = 0
    read_ahead: int = 0
    """Prompts read back from disk into memory as the worker started, before any asked for them."""


class HeldRoutes:
    """The routing names (shared/prefix_blocks.py) of the blocks this worker has kept, for the claim script
    to send a job to the worker that holds its start. A hint: a name stays after its cache left (the
    worker then computes what it lacks), and all of them go once there are more than HELD_ROUTES."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._new: list[str] = []
        self._lock = threading.Lock()

    def add(self, model: str, ids: Sequence[int]) -> None:
        self.extend(routes(model, ids))

    def extend(self, names: Sequence[str]) -> None:
        with self._lock:
            if len(self._held) + len(names) > HELD_ROUTES:
                self._held.clear()
                self._new.clear()
            fresh = [name for name in names if name not in self._held]
            self._held.update(fresh)
            self._new.extend(fresh)

    def take_new(self) -> list[str]:
        with self._lock:
            new, self._new = self._new, []
            return new

    def put_back(self, names: list[str]) -> None:
        with self._lock:
            self._new[:0] = names

    def all(self) -> list[str]:
        with self._lock:
            return list(self._held)


@dataclass
class _Served:
    """What the disk tier needs of a model: its files' identity, whether its caches can be cut, and a
    fresh cache to fill (from the model while it is loaded: a weak reference, never what keeps it)."""

    identity: str
    cuttable: bool
    model: weakref.ref[Any] = field(repr=False)

    def fresh(self) -> list[Any]:
        model = self.model()
        if model is None:
            raise ValueError("the model was unloaded")
        return list(make_prompt_cache(model))


class KVCacheManager:
    """KV caches kept for every model (prefixes and states), under one byte budget in memory and another
    on disk."""

    def __init__(self, budget_bytes: int, disk: PrefixDisk | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._lru = LRUPromptCache(max_size=1 << 16, max_bytes=max(0, budget_bytes))
        self._openings = Openings()
        self.disk = disk if disk is not None and disk.enabled and budget_bytes > 0 else None
        """Only behind memory: what the disk gives back is kept in memory first."""
        self.hits = Hits()
        self.routes = HeldRoutes()
        if self.disk is not None:
            self.routes.extend(self.disk.held_routes(HELD_ROUTES))  # published at the first beat, before any is read
        self._served: dict[str, _Served] = {}

    def serving(self, model: str, loaded: Any, identity: str, cuttable: bool) -> None:
        """`model` is `loaded` now, its files `identity`: its caches on disk can be found and filled."""
        served = self._served.get(model)
        if served is None or served.model() is not loaded or served.identity != identity:
            self._served[model] = _Served(identity, cuttable, weakref.ref(loaded))

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def nbytes(self) -> int:
        """What it holds, as the memory ledger counts it."""
        return int(self._lru.nbytes)

    # -- lookups ----------------------------------------------------------------------

    def seed(self, model: str, ids: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A copy of the cache of the longest kept prefix of `ids` and its length (None, 0 when
        nothing worth reusing is kept). At least the last token is left to compute: generation
        starts from its logits."""
        if not self.enabled or len(ids) <= MIN_REUSED_TOKENS:
            return None, 0
        ids = list(ids)
        self.hits.lookups += 1
        cache, reused = self._from_memory(model, ids)
        stored = self._from_disk(model, ids, reused)
        if stored is not None:
            cache, reused = stored
            self.hits.disk += 1
            self.hits.disk_tokens += reused
        elif cache is not None and reused >= MIN_REUSED_TOKENS:
            self.hits.memory += 1
            self.hits.memory_tokens += reused
        if cache is None or reused < MIN_REUSED_TOKENS:
            return None, 0
        for layer in layers(cache):
            compact(layer)  # a longer entry the trie cut to the shared part holds all of its buffer
        return cache, reused

    def _from_memory(self, model: str, ids: list[int]) -> tuple[list[Any] | None, int]:
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
        return (None, 0) if cache is None else (cache, len(ids) - len(rest))

    def _from_disk(self, model: str, ids: list[int], reused: int) -> tuple[list[Any], int] | None:
        """A copy of a longer start of `ids` than memory's `reused` tokens, read from disk and kept in memory."""
        read = self._into_memory(model, ids, reused)
        return None if read is None else (copy.deepcopy(read[0]), read[1])

    def _into_memory(self, model: str, ids: list[int], reused: int) -> tuple[list[Any], int] | None:
        served = self._served.get(model)
        if self.disk is None or served is None:
            return None
        found = self.disk.find(served.identity, ids, served.cuttable, max(reused, MIN_REUSED_TOKENS - 1))
        if found is None:
            return None
        read = self.disk.read(found, ids, served.fresh)
        if read is None or read[1] <= reused:
            return None
        stored, tokens = read
        self._lru.insert_cache(model, ids[:tokens], stored)
        self.routes.add(model, ids[:tokens])
        return stored, tokens

    def recent_prompts(self, model: str, limit: int) -> list[list[int]]:
        """The prompts whose ends the disk holds for `model` (served: `serving`), the most recently used first.
        Where a cache can be cut, a prompt that starts another one is left out: the longer one's cache, cut,
        serves it (a turn's prompt and the same turn with its answer are both kept: read once, not twice)."""
        served = self._served.get(model)
        if self.disk is None or served is None:
            return []
        prompts = self.disk.recent_prompts(served.identity, limit)
        if not served.cuttable:
            return prompts
        return [a for a in prompts if not any(len(a) < len(b) and b[: len(a)] == a for b in prompts)]

    @property
    def room_to_read_ahead(self) -> bool:
        """Memory is less than half full: the rest is for what is computed next."""
        return self.nbytes < self.budget_bytes // 2

    def read_ahead(self, model: str, prompt: list[int]) -> bool:
        """Read `prompt`'s kept prefix from disk into memory before any request asks for it; whether it was."""
        # Its last token is one a request would compute (generation starts from its logits): one more is added,
        # so that the whole prompt is what is looked for.
        if self._into_memory(model, [*prompt, 0], 0) is None:
            return False
        self.hits.read_ahead += 1
        return True

    def segments(self, model: str, row: Row, reused: int, keeps_states: bool) -> list[list[int]]:
        """The prompt's tokens still to compute, in segments: the generator stops at each segment's end,
        where the state of a cache that cannot be cut is kept (the end of the system messages)."""
        ids = row.context_ids
        end = self._openings.end(model, row) if keeps_states else None  # a cut-anywhere cache needs none
        bounds = [reused, *([end] if end is not None and reused < end < len(ids) - 1 else []), len(ids)]
        return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    # -- what is kept -----------------------------------------------------------------

    def keep_copy(self, model: str, ids: Sequence[int], cache: Sequence[Any], held: int) -> bool:
        """Keep a copy of the first `len(ids)` positions of `cache`, which holds `held` tokens
        beginning with `ids`; older entries go past the budget. False when it is not kept (too short,
        too big, or a cache that cannot be cut there)."""
        return self._keep(model, ids, cache, held, ())

    def _keep(self, model: str, ids: Sequence[int], cache: Sequence[Any], held: int, ends: Sequence[int]) -> bool:
        """`keep_copy`; on disk also the tails ending at `ends` (`PrefixDisk.keep`)."""
        if not self.enabled or len(ids) < MIN_REUSED_TOKENS:
            return False
        kept = copied(cache, held, len(ids))
        if kept is None or nbytes(kept) > self.budget_bytes:
            return False
        self._lru.insert_cache(model, list(ids), kept)
        named = routes(model, ids)
        self.routes.extend(named)
        served = self._served.get(model)
        if self.disk is not None and served is not None:
            self.disk.keep(served.identity, ids, kept, served.cuttable, named, ends)
        return True

    def finished(self, model: str, tokens: list[int], cache: list[Any], job_id: str, prompt: int) -> None:
        """A finished row's cache (its `prompt` tokens and what it generated, `tokens`): the next turn of the
        same chat starts from it, and on disk from its prompt's end too (`PrefixDisk.keep`'s `ends`)."""
        if not cache or not self.enabled:
            return
        try:
            self._keep(model, tokens, cache, len(tokens), (prompt,))
        except Exception:
            logger.exception("could not keep a finished prompt's cache", extra={"job_id": job_id})

    def state_reached(self, model: str, extract: Callable[[], dict[Any, Any]], job_id: str) -> None:
        """The state of a row whose prefill reached the end of a segment (the end of the system
        messages, or all of the prompt but its last token), `extract`ed from the generator: what a later
        prompt extending it resumes from, since this cache cannot be cut back to here later."""
        if not self.enabled:
            return
        try:
            for cache, tokens in extract().values():
                self.keep_copy(model, tokens, cache, len(tokens))
        except Exception:
            logger.exception("could not keep a prompt's state", extra={"job_id": job_id})

    # -- giving bytes back ------------------------------------------------------------

    def shrink_to(self, budget_bytes: int) -> None:
        self._lru.trim_to(n_bytes=max(0, budget_bytes))

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)


class Openings:
    """Where prompts' system messages end, their openings rendered once per model and content (the
    most recent OPENINGS_KEPT kept): every turn of a session, and every session with one system prompt,
    would otherwise render and encode a long system prompt again on the engine thread."""

    def __init__(self) -> None:
        self._rendered: OrderedDict[tuple[str, str], list[int] | None] = OrderedDict()

    def end(self, model: str, row: Row) -> int | None:
        """Where `row`'s system messages end, when they take at least KEPT_SEGMENT_TOKENS; None otherwise.
        Found as mlx-lm's server finds it: the system messages rendered before an empty user turn, and
        the tokens that rendering shares with the prompt."""
        if row.request.messages is None or row.tokenizer is None:
            return None
        messages, tools, kwargs = row.request.for_template()
        system = [m for m in messages[: len(messages) - 1] if m["role"] in ("system", "developer")]
        if len(system) == 0 or messages[: len(system)] != system:
            return None
        key = (model, json.dumps([system, tools, kwargs], sort_keys=True, default=str))
        if key not in self._rendered:
            self._rendered[key] = _opening(row.tokenizer, system, tools, kwargs)
            while len(self._rendered) > OPENINGS_KEPT:
                self._rendered.popitem(last=False)
        self._rendered.move_to_end(key)
        opening = self._rendered[key]
        end = 0 if opening is None else shared_length(row.prompt_ids, opening)
        return end if end >= KEPT_SEGMENT_TOKENS else None


def _opening(tokenizer: Any, system: list[dict[str, Any]], tools: Any, kwargs: dict[str, Any]) -> list[int] | None:
    try:
        rendered: list[int] = tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": ""}],
            tools=tools,
            add_generation_prompt=False,
            tokenize=True,
            **kwargs,
        )
    except Exception:
        return None  # a template that will not render this opening alone: no segment
    return list(rendered)
