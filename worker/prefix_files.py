"""How the prefix disk tier (worker/prefix_disk.py) names, writes, sizes and checks its files.

A file's name says what it holds and proves its bytes: `b-<chain>` for a block of
a cache that can be cut (the chain of hashes of shared/prefix_blocks.py),
`t-<chain>-<hash>-<tokens>` for such a cache's tail past its last whole block,
`s-<hash>-<tokens>` for a whole state, then a digest of the file's bytes, and for
a block its routing name (shared/prefix_blocks.py: a worker started again
publishes what its disk holds without reading a file). The identity directory it
is in names the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import save_prompt_cache
from safetensors import safe_open

from shared.prefix_blocks import BLOCK_TOKENS

DEFAULT_SHARE_OF_FREE = 0.25
DEFAULT_CEILING_BYTES = 64 << 30
"""The default budget: a quarter of the free space where the tier lives, at most 64 GiB."""

NAME = re.compile(
    r"^(?P<key>b-[0-9a-f]{32}|s-[0-9a-f]{32}-\d+|t-[0-9a-f]{32}-[0-9a-f]{32}-\d+)\.(?P<digest>[0-9a-f]{32})(?:\.(?P<route>[0-9a-f]{16}))?\.safetensors$"
)

MIN_TAIL_TOKENS = 16
"""A cut-anywhere cache's tokens past its last whole block are kept (a tail file) from this many: the next
turn, or the same turn after a restart, then resumes at the exact token, not at the block before it."""


IDENTITY = re.compile(r"^[0-9a-f]{32}$")


def default_budget(root: Path) -> int:
    """A sane disk budget from the free space of the filesystem `root` is (or will be) on."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return 0
    return int(min(free * DEFAULT_SHARE_OF_FREE, DEFAULT_CEILING_BYTES))


def state_key(names: list[bytes], ids: Sequence[int], tokens: int) -> str:
    whole = tokens // BLOCK_TOKENS
    tail = array("q", ids[whole * BLOCK_TOKENS : tokens]).tobytes()
    return f"s-{hashlib.blake2b(names[whole] + b'state' + tail, digest_size=16).hexdigest()}-{tokens}"


def block_key(names: list[bytes], k: int) -> str:
    return f"b-{names[k].hex()}"


def tail_key(names: list[bytes], ids: Sequence[int], k: int, tokens: int) -> str:
    """The tail of `ids` from block k's end to `tokens`, filed under block k's name."""
    tail = array("q", ids[k * BLOCK_TOKENS : tokens]).tobytes()
    return f"t-{names[k].hex()}-{hashlib.blake2b(names[k] + b'tail' + tail, digest_size=16).hexdigest()}-{tokens}"


def group(key: str) -> tuple[str, int] | None:
    """Where a file's length is indexed: ("s", tokens) for a whole state, (its block's name, tokens) for a
    tail; None for a block (found by its name alone)."""
    if key.startswith("s-"):
        return "s", int(key.rsplit("-", 1)[1])
    if key.startswith("t-"):
        return key[2:34], int(key.rsplit("-", 1)[1])
    return None


@dataclass
class KeptFile:
    path: Path
    size: int
    used: float
    """When it was last written or read (its mtime, across restarts)."""
    depth: int = 0
    """A block's place in its chain: of two used together, the later block leaves first."""
    routes: tuple[str, ...] = ()
    """The routing names of the blocks it holds (a block's own; a whole state's, from its metadata)."""


def positional(layer: Any, tokens: int) -> bool:
    """Whether a layer holds its keys and values by position, `tokens` of them from the first."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    return (
        isinstance(keys, mx.array)
        and isinstance(values, mx.array)
        and getattr(layer, "offset", None) == tokens
        and keys.ndim == 4
        and keys.shape[2] >= tokens
        and values.shape[2] >= tokens
    )


ROUTES = "mlxq_routes"
"""A whole state's metadata field: the routing names of its whole blocks, space-separated."""

PROMPT = "mlxq_prompt"
"""A tail's header: the whole prompt it ends (the ids of its blocks and its own), read back by a worker started
again (worker/prefix_disk.py `recent_prompts`)."""


def state_routes(path: Path) -> tuple[str, ...]:
    """The routing names a whole state's file holds, from its header alone; none from a file that does not
    read (its first use finds it bad)."""
    try:
        with safe_open(str(path), framework="numpy") as opened:
            flat = opened.metadata() or {}
        # Laid out as mlx-lm's save_prompt_cache writes it (and its load_prompt_cache reads it): ours first.
        metadata = tree_unflatten(list(flat.items()))[0]
        return tuple(str(metadata.get(ROUTES, "")).split())
    except Exception:
        return ()


def kept_prompt(path: Path) -> list[int] | None:
    """The whole prompt a tail's or a whole state's file ends, from its header alone; None from a file that
    does not say (a block, a tail written before tails named their prompts) or does not read."""
    try:
        with safe_open(str(path), framework="numpy") as opened:
            flat = opened.metadata() or {}
        if path.name.startswith("s-"):
            # A state is laid out as mlx-lm's save_prompt_cache writes it: ours first; its tokens are the prompt.
            ids = json.loads(str(tree_unflatten(list(flat.items()))[0].get("mlxq_tokens", "null")))
        else:
            ids = json.loads(flat.get(PROMPT, "null"))
    except Exception:
        return None
    return [int(i) for i in ids] if isinstance(ids, list) else None


def digest(path: Path) -> str:
    """The digest a file's name carries: SHA-256's first 16 bytes, which processors compute in hardware
    (several times blake2b's speed: it was a third of a kept prefix's read)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def digest_matches(data: bytes, expected: str) -> bool:
    """Whether `data` has the digest `expected`: SHA-256's, or blake2b's in files written before it."""
    if hashlib.sha256(data).hexdigest()[:32] == expected:
        return True
    return hashlib.blake2b(data, digest_size=16).hexdigest() == expected


@dataclass
class PendingWrite:
    """A file on its way to disk: a block's span of each layer's keys and values, or a whole state."""

    identity: str
    key: str
    at: float
    depth: int
    span: tuple[int, int] = (0, 0)
    kv: list[tuple[mx.array, mx.array]] = field(default_factory=list)
    """A block: each layer's keys and values (computed already), of which positions `span` are written."""
    metadata: dict[str, str] = field(default_factory=dict)
    cache: list[Any] | None = None
    """A whole state, written by mlx-lm's save_prompt_cache."""
    route: str = ""
    """A block's routing name, in its file's name."""


def write_sealed(directory: Path, write: PendingWrite) -> Path:
    """`write`'s file in `directory`, owner-only, whole or not at all: written beside, flushed to the disk, then
    renamed to its key and the digest of its bytes (what a read checks)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    temporary = directory / f".{write.key}.{threading.get_ident()}.tmp"
    metadata = {"mlxq_identity": write.identity, **write.metadata}
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            if write.cache is not None:
                save_prompt_cache(out, write.cache, metadata)  # type: ignore[arg-type]
            else:
                a, b = write.span
                arrays: dict[str, mx.array] = {}
                for i, (keys, values) in enumerate(write.kv):
                    arrays[f"{i}.keys"], arrays[f"{i}.values"] = keys[..., a:b, :], values[..., a:b, :]
                mx.save_safetensors(out, arrays, metadata)
            out.flush()
            os.fsync(out.fileno())
        route = f".{write.route}" if write.route else ""
        final = directory / f"{write.key}.{digest(temporary)}{route}.safetensors"
        os.utime(temporary, (write.at, write.at))
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return final
