"""How the prefix disk tier (worker/prefix_disk.py) names, sizes and checks its files.

A file's name says what it holds and proves its bytes: `b-<chain>` for a block of
a cache that can be cut (the chain of hashes of shared/prefix_blocks.py),
`s-<hash>-<tokens>` for a whole state, then a digest of the file's bytes. The
identity directory it is in names the model.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from shared.prefix_blocks import BLOCK_TOKENS

DEFAULT_SHARE_OF_FREE = 0.25
DEFAULT_CEILING_BYTES = 64 << 30
"""The default budget: a quarter of the free space where the tier lives, at most 64 GiB."""

NAME = re.compile(r"^(?P<key>b-[0-9a-f]{32}|s-[0-9a-f]{32}-(?P<tokens>\d+))\.(?P<digest>[0-9a-f]{32})\.safetensors$")


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


@dataclass
class KeptFile:
    path: Path
    size: int
    used: float
    """When it was last written or read (its mtime, across restarts)."""
    depth: int = 0
    """A block's place in its chain: of two used together, the later block leaves first."""


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


def digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
