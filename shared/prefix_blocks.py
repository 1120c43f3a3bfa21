"""Blocks of a prompt's token ids, named by a chain of hashes: what the disk tier files kept prefixes
under (worker/prefix_disk.py) and what routes a job to the worker that holds its start (claim.lua).

Block k's name hashes the names before it with its own ids, so two prompts share the names of exactly
the blocks they share from the first token: a session's turns, and sessions with one system prompt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BLOCK_TOKENS = 64
"""Tokens a block holds (vllm-mlx's paged cache's size): a prompt that leaves a kept one anywhere but at its exact
end (a client that rewrote the last answer) recomputes at most this many past the shared blocks."""

ROUTE_HASHES = 16
"""Block names a job carries for routing: its deepest 8, then 8 spread over the rest."""


def chain(seed: str, ids: Sequence[int], digest_size: int = 16) -> list[bytes]:
    """`chain(...)[k]` names the first k blocks of `ids` under `seed` (a model's identity or name)."""
    names = [hashlib.blake2b(seed.encode(), digest_size=digest_size).digest()]
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = array("q", ids[start : start + BLOCK_TOKENS]).tobytes()
        names.append(hashlib.blake2b(names[-1] + block, digest_size=digest_size).digest())
    return names


def routes(model: str, ids: Sequence[int]) -> list[str]:
    """Every whole block's routing name of `ids` for `model`, the first block's first."""
    return [name.hex() for name in chain(model, ids, digest_size=8)[1:]]


def job_routes(model: str, ids: Sequence[int]) -> list[str]:
    """The routing names a job carries, deepest first: a worker holding a deeper one holds more of it.
    Its last token is left out: a prompt's last token is always computed."""
    names = routes(model, ids[:-1])
    deepest = names[::-1][: ROUTE_HASHES // 2]
    rest = names[: len(names) - len(deepest)]
    step = max(1, len(rest) // (ROUTE_HASHES // 2))
    return deepest + rest[::-1][::step][: ROUTE_HASHES // 2]
