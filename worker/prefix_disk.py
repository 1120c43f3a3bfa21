"""The disk tier of kept prefixes: KV caches that outlive the worker, for every session that starts alike.

A prefix computed once is worth keeping past the process that computed it: an
agent's system prompt and tools are tens of thousands of tokens, minutes of
prefill on a large model, and a worker restart (a crash, a deploy) or a model
unloaded under memory pressure would otherwise start every session cold again.

The layout is content-addressed, one directory per model identity (a hash of
the model's files, worker/model_files.py, so a changed model never reads an old
state), owner only. A cache that can be cut at any token is kept in blocks of
`BLOCK_TOKENS`: block k is named by a chain of hashes over the token ids of
blocks 0..k, so sessions that share a start share its files, and a later turn
writes only its new blocks. A cache that cannot be cut (a sliding window that
wrapped, a recurrent state) is kept whole, at exactly the tokens it holds, in
mlx-lm's own prompt-cache format. Each file's name carries a digest of its bytes:
a read checks it, then the identity and token ids the file says it holds, so a
truncated, corrupt or foreign file is a miss (and is removed), never wrong text.

Writes go through a bounded queue to a thread of their own (worker/prefix_writer.py):
the engine thread hands over arrays already computed and goes on. The tier holds at most
`budget_bytes`, least recently used out first (a file's mtime is its last use,
so the order survives restarts). A write the disk refuses (full, over quota)
turns writing off with one log line; reads go on and nothing fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache

from shared.prefix_blocks import BLOCK_TOKENS, chain
from worker.cache_shape import layers
from worker.prefix_files import (
    IDENTITY,
    MIN_TAIL_TOKENS,
    NAME,
    PROMPT,
    ROUTES,
    KeptFile,
    PendingWrite,
    block_key,
    digest_matches,
    kept_prompt,
    positional,
    state_key,
    state_routes,
    tail_key,
    write_sealed,
)
from worker.prefix_index import KeptFiles
from worker.prefix_writer import PrefixWriter

logger = logging.getLogger(__name__)

MIN_STATE_TOKENS = 256
"""A whole state this long is worth a file: shorter prompts cost less to compute than to read back."""


@dataclass(frozen=True)
class Found:
    """What the disk holds of a prompt's start: `tokens` of it, in the files of `keys`."""

    identity: str
    tokens: int
    keys: tuple[str, ...]
    whole: bool
    """One state file (a cache that cannot be cut) rather than blocks."""


@dataclass
class DiskStats:
    hits: int = 0
    hit_tokens: int = 0
    misses_bad_file: int = 0
    written_bytes: int = 0
    dropped_writes: int = 0


class PrefixDisk:
    """Kept prefixes on disk under `root`, at most `budget_bytes` of them."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = max(0, budget_bytes)
        self.writing = self.budget_bytes > 0
        """False once the disk refused a write (or with no budget): reads go on."""
        self.stats = DiskStats()
        self._files = KeptFiles()
        self._lock = threading.Lock()
        self._writer = PrefixWriter(self._write, self._refused)
        if self.budget_bytes > 0:
            self._open()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._files.nbytes

    def _open(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)  # the caches hold what the prompts said
            for directory in self.root.iterdir():
                if directory.is_dir() and IDENTITY.match(directory.name):
                    self._scan(directory)
        except OSError as exc:
            logger.warning("the prefix disk tier at %s cannot be used (%s); it is off", self.root, exc)
            self.budget_bytes, self.writing = 0, False

    def _scan(self, directory: Path) -> None:
        for path in directory.iterdir():
            match = NAME.match(path.name)
            if match is None:
                if path.is_file() and path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)  # a write cut short
                continue
            stat = path.stat()
            key = match["key"]
            named = (match["route"],) if match["route"] else state_routes(path) if key.startswith("s-") else ()
            self._files.add(directory.name, key, KeptFile(path, stat.st_size, stat.st_mtime, routes=named))

    def held_routes(self, limit: int) -> list[str]:
        """The routing names of what the tier holds (shared/prefix_blocks.py), at most `limit`, of the files
        used last: what a worker started again publishes before any of it is read."""
        with self._lock:
            kept = sorted((f for _, _, f in self._files.every()), key=lambda f: -f.used)
        return [route for f in kept for route in f.routes][:limit]

    def recent_prompts(self, identity: str, limit: int) -> list[list[int]]:
        """The prompts whose ends the tier holds for `identity` (a tail or a whole state each), the most
        recently used first, at most `limit`: what a worker started again reads back before it is asked."""
        with self._lock:
            ends = [f for key, f in self._files.of(identity).items() if key[0] in "ts"]
        ends.sort(key=lambda f: -f.used)
        prompts = (kept_prompt(f.path) for f in ends[:limit])
        return [ids for ids in prompts if ids]

    # -- finding and reading ---------------------------------------------------------------

    def find(self, identity: str, ids: Sequence[int], cuttable: bool, longer_than: int) -> Found | None:
        """The longest start of `ids` (but its last token: generation starts from its logits) that the
        disk holds, when longer than `longer_than` tokens. Nothing is read."""
        if not self.enabled:
            return None
        with self._lock:
            files = self._files.of(identity)
            if not files:
                return None
            names = chain(identity, ids[:-1])
            if cuttable:
                k = 0
                while k + 1 < len(names) and block_key(names, k + 1) in files:
                    k += 1
                keys, tokens = tuple(block_key(names, j) for j in range(1, k + 1)), k * BLOCK_TOKENS
                for n in self._files.lengths(identity, names[k].hex()):
                    if tokens < n < len(ids) and (tail := tail_key(names, ids, k, n)) in files:
                        keys, tokens = (*keys, tail), n
                        break
                return Found(identity, tokens, keys, False) if tokens > longer_than else None
            for tokens in self._files.lengths(identity, "s"):
                if tokens <= longer_than:
                    return None
                if tokens < len(ids):
                    key = state_key(names, ids, tokens)
                    if key in files:
                        return Found(identity, tokens, (key,), True)
        return None

    def read(self, found: Found, ids: Sequence[int], fresh: Callable[[], list[Any]]) -> tuple[list[Any], int] | None:
        """The cache of `found` (or of the blocks of it that read well) verified against `ids`, and the
        tokens it holds; None when nothing does. A missing, truncated, corrupt or foreign file is removed."""
        try:
            read = self._read_whole(found, ids) if found.whole else self._read_blocks(found, ids, fresh)
        except Exception as exc:
            self._bad(exc)
            read = None
        if read is None:
            return None
        self.stats.hits += 1
        self.stats.hit_tokens += read[1]
        return read

    def _bad(self, exc: BaseException) -> None:
        self.stats.misses_bad_file += 1
        logger.warning("a kept prefix on disk could not be read (%s: %s); computing it", type(exc).__name__, exc)

    def _verified(self, identity: str, key: str, at: float) -> KeptFile | None:
        """A file's entry, its bytes checked against the digest in its name; None when it is gone. The
        caller loads it from its path: MLX reads a file itself at several times the speed it parses the
        same bytes handed over from Python. (A file is never rewritten under its name, which is its
        digest; one removed meanwhile fails that load, as a bad file.)"""
        with self._lock:
            entry = self._files.of(identity).get(key)
        if entry is None:
            return None
        try:
            match = NAME.match(entry.path.name)
            if match is None or not digest_matches(entry.path.read_bytes(), match["digest"]):
                raise ValueError("its bytes are not those written")
            os.utime(entry.path, (at, at))  # its last use, for the order files leave in (across restarts too)
        except Exception:
            self._forget(identity, key, remove=True)
            raise
        entry.used = at  # a chain's blocks, read together, share it: the later ones leave first
        return entry

    def _check(self, identity: str, key: str, metadata: dict[str, Any], ids: Sequence[int]) -> None:
        if metadata.get("mlxq_identity") != identity or json.loads(metadata.get("mlxq_tokens", "null")) != list(ids):
            self._forget(identity, key, remove=True)
            raise ValueError("it holds another model's state or other tokens than its name says")

    def _read_blocks(
        self, found: Found, ids: Sequence[int], fresh: Callable[[], list[Any]]
    ) -> tuple[list[Any], int] | None:
        pieces: list[dict[str, mx.array]] = []
        at, tokens = time.time(), 0
        for k, key in enumerate(found.keys):
            end = found.tokens if key.startswith("t-") else (k + 1) * BLOCK_TOKENS
            try:
                verified = self._verified(found.identity, key, at)
                if verified is None:
                    break
                loaded: Any = mx.load(str(verified.path), return_metadata=True)
                arrays, metadata = loaded
                self._check(found.identity, key, metadata, ids[k * BLOCK_TOKENS : end])
            except Exception as exc:
                self._bad(exc)
                break  # the blocks before it serve
            pieces.append(arrays)
            tokens = end
        if not pieces:
            return None
        cache = fresh()
        flat = list(layers(cache))
        if any(len(piece) != 2 * len(flat) for piece in pieces):
            raise ValueError("its layers are not the model's")
        for i, layer in enumerate(flat):
            layer.keys = mx.concatenate([piece[f"{i}.keys"] for piece in pieces], axis=2)
            layer.values = mx.concatenate([piece[f"{i}.values"] for piece in pieces], axis=2)
            layer.offset = tokens
        mx.eval([(layer.keys, layer.values) for layer in flat])
        return cache, tokens

    def _read_whole(self, found: Found, ids: Sequence[int]) -> tuple[list[Any], int] | None:
        [key] = found.keys
        verified = self._verified(found.identity, key, time.time())  # before mlx-lm reads it
        if verified is None:
            return None
        cache, metadata = load_prompt_cache(str(verified.path), return_metadata=True)  # type: ignore[no-untyped-call]
        self._check(found.identity, key, metadata, ids[: found.tokens])
        return list(cache), found.tokens

    # -- writing -------------------------------------------------------------------------------

    def keep(
        self,
        identity: str,
        ids: Sequence[int],
        cache: Sequence[Any],
        cuttable: bool,
        named: Sequence[str],
        ends: Sequence[int] = (),
    ) -> None:
        """Write what the disk lacks of `cache` (which holds exactly `ids`) off the engine thread: its new
        blocks and its tail, or the whole state of a cache that cannot be cut. Never waits on the disk. `named`
        are the routing names of `ids`' blocks (those of the workers' claims); `ends` are earlier lengths whose
        tails are written too: a finished row's prompt's, where a client that keeps its own record of the answer
        goes on (after a restart it resumes there exactly, as it does from memory, not at the block before)."""
        if not self.writing:
            return
        names, at = chain(identity, ids), time.time()
        if cuttable:
            flat = list(layers(cache))
            if not all(positional(layer, len(ids)) for layer in flat):
                return  # not laid out by position: nothing here knows how to cut it into blocks
            for k in range(1, len(names)):
                key = block_key(names, k)
                if not self._wanted(identity, key, at):
                    continue
                span = ((k - 1) * BLOCK_TOKENS, k * BLOCK_TOKENS)
                self._submit_span(identity, key, at, k, ids, span, flat, named[k - 1])
            for end in (len(ids), *ends):
                k = end // BLOCK_TOKENS
                # A prompt shorter than a block recomputes faster than its file is written and read back.
                if k and MIN_TAIL_TOKENS <= end - k * BLOCK_TOKENS and end <= len(ids):
                    key = tail_key(names, ids, k, end)
                    if self._wanted(identity, key, at):
                        span = (k * BLOCK_TOKENS, end)
                        self._submit_span(identity, key, at, k + 1, ids, span, flat, "", prompt=True)
        elif len(ids) >= MIN_STATE_TOKENS:
            key = state_key(names, ids, len(ids))
            if self._wanted(identity, key, at):
                metadata = {"mlxq_tokens": json.dumps(list(ids)), ROUTES: " ".join(named)}
                self._submit(PendingWrite(identity, key, at, 0, metadata=metadata, cache=list(cache)))

    def _submit_span(
        self,
        identity: str,
        key: str,
        at: float,
        depth: int,
        ids: Sequence[int],
        span: tuple[int, int],
        flat: list[Any],
        route: str,
        prompt: bool = False,
    ) -> None:
        """A block or, with `prompt`, a prompt's tail, which also names the whole prompt it ends (`PROMPT`)."""
        kv = [(layer.keys, layer.values) for layer in flat]
        tokens = {"mlxq_tokens": json.dumps(list(ids[span[0] : span[1]]))}
        if prompt:
            tokens[PROMPT] = json.dumps(list(ids[: span[1]]))
        self._submit(PendingWrite(identity, key, at, depth, span, kv, tokens, route=route))

    def _wanted(self, identity: str, key: str, at: float) -> bool:
        """Whether the file is neither on its way to disk nor on it (it is used again now)."""
        # The writer's record first: a write that ends meanwhile has made the file's record before it leaves it.
        if self._writer.pending(identity, key):
            return False
        with self._lock:
            kept = self._files.of(identity).get(key)
            if kept is None:
                return True
            kept.used = at
            return False

    def _submit(self, write: PendingWrite) -> None:
        if not self._writer.submit(write):
            self.stats.dropped_writes += 1

    def _write(self, write: PendingWrite) -> None:
        if not self.writing:
            return
        final = write_sealed(self.root / write.identity, write)
        size = final.stat().st_size
        named = (write.route,) if write.route else tuple(write.metadata.get(ROUTES, "").split())
        with self._lock:
            self._files.add(write.identity, write.key, KeptFile(final, size, write.at, write.depth, named))
        self.stats.written_bytes += size
        self._evict()

    def _refused(self, exc: OSError) -> None:
        self.writing = False
        logger.warning("the disk refused a kept prefix (%s); the prefix disk tier stops writing", exc)

    def _evict(self) -> None:
        """Least recently used out, until the tier is within its budget."""
        with self._lock:
            entries = sorted(self._files.every(), key=lambda entry: (entry[2].used, -entry[2].depth))
            total = sum(f.size for _, _, f in entries)
            for identity, key, f in entries:
                if total <= self.budget_bytes:
                    break
                total -= f.size
                self._forget_locked(identity, key, remove=True)

    @property
    def queued(self) -> int:
        """Files on their way to disk: what a worker killed now would not find there when it starts again."""
        return self._writer.queued

    def flush(self) -> None:
        """Wait for the writes queued so far (tests, and a worker that stops)."""
        self._writer.flush()

    def _forget(self, identity: str, key: str, remove: bool) -> None:
        with self._lock:
            self._forget_locked(identity, key, remove)

    def _forget_locked(self, identity: str, key: str, remove: bool) -> None:
        entry = self._files.pop(identity, key)
        if entry is not None and remove:
            with contextlib.suppress(OSError):
                entry.path.unlink()
