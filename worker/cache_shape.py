"""What a model's cache can do and what it holds, asked of mlx-lm's cache objects.

mlx-lm gives each layer a cache of its own kind: keys and values of every
position (full attention, latent attention), of the last few (a sliding window),
or a state of fixed size (a gated delta net's, a Mamba layer's). Nothing here
lists those kinds: each layer is asked whether it can be trimmed, how many
positions it holds and how many bytes, so a family mlx-lm adds tomorrow works
as long as its cache answers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

from shared.sizing import KvShape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheKind:
    """What a model's caches can do, asked once of a fresh one when the model is loaded."""

    unbatched: tuple[str, ...]
    """Layer cache types mlx-lm's BatchGenerator cannot merge (none in today's families)."""
    cuttable: bool
    """`cuttable` below: a member's cache may be cut and copied for others."""
    recurrent: bool
    """`recurrent` below: its rows are prefilled one at a time (batched Mamba layers are not exact over padding)."""


def kind(model: Any) -> CacheKind:
    fresh = make_prompt_cache(model)
    unbatched = tuple(sorted({type(layer).__name__ for layer in fresh if not hasattr(layer, "merge")}))
    return CacheKind(unbatched, cuttable(fresh), recurrent(fresh))


def layers(cache: Sequence[Any]) -> Iterator[Any]:
    """Every layer's cache, those inside a composite (mlx-lm's CacheList) one by one."""
    for layer in cache:
        inner = getattr(layer, "caches", None)
        if inner is not None:
            yield from layers(inner)
        else:
            yield layer


def cuttable(cache: Sequence[Any]) -> bool:
    """Whether caches of this shape can be cut at any token however long they grow: each layer can be
    trimmed and none is a window that stops being trimmable once it wraps."""
    return (
        bool(cache)
        and can_trim_prompt_cache(list(cache))
        and all(getattr(layer, "max_size", None) is None for layer in layers(cache))
    )


def recurrent(cache: Sequence[Any]) -> bool:
    """Whether some layer's state is not a cache of positions (a gated delta net's, a Mamba layer's):
    it cannot be trimmed even when empty."""
    return not can_trim_prompt_cache(list(cache))


def copied(cache: Sequence[Any], held: int, tokens: int) -> list[Any] | None:
    """A copy of `cache`, which holds `held` tokens, holding only the first `tokens` of them; None
    when it cannot be cut there. Copied, so the source may go on or be dropped."""
    if tokens > held or (tokens < held and not can_trim_prompt_cache(list(cache))):
        return None
    fresh: list[Any] = copy.deepcopy(list(cache))
    trim(fresh, held - tokens)
    mx.eval([layer.state for layer in fresh])
    return fresh


def trim(cache: Sequence[Any], tokens: int) -> None:
    """Drops the last `tokens` positions of a cache that can be trimmed, and the buffer they took: what
    is kept of it holds only what it serves."""
    if tokens <= 0:
        return  # nothing to cut (a recurrent state could not be)
    for layer in cache:
        layer.trim(tokens)
    for layer in layers(cache):
        compact(layer)


def compact(layer: Any) -> None:
    """Drops what a trimmed layer keeps past its positions: a copy holds only what it serves."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    size = layer.size()
    if not isinstance(keys, mx.array) or not isinstance(values, mx.array) or keys.shape[2] <= size:
        return
    if size != getattr(layer, "offset", None):
        return  # positions not in order from the first: left as they are
    layer.keys, layer.values = mx.contiguous(keys[..., :size, :]), mx.contiguous(values[..., :size, :])
    if hasattr(layer, "_idx"):
        layer._idx = size  # a window not yet wrapped writes its next position here


def nbytes(cache: Sequence[Any]) -> int:
    return int(sum(layer.nbytes for layer in cache))


def measured(model: Any, fallback: KvShape) -> KvShape:
    """`measure(model)`, or `fallback` (what config.json says) where the model will not be measured."""
    try:
        return measure(model)
    except Exception:
        logger.warning("could not measure the model's cache; counting it as its config.json says", exc_info=True)
        return fallback


def measure(model: Any) -> KvShape:
    """What one row's cache of `model` holds, by kind of layer: from the cache of a one-token prompt,
    bytes per position of layers that grow with the context (those with a window stop at its size) and
    the bytes of states that do not grow."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    mx.eval([layer.state for layer in cache])
    growing, per_row = 0, 0
    windows: list[tuple[int, int]] = []
    for layer in layers(cache):
        positions = _allocated(layer)
        if layer.size() == 0 or positions == 0:
            per_row += int(layer.nbytes)
            continue
        per_token = int(layer.nbytes) // positions
        window = getattr(layer, "max_size", None)
        if window is None:
            growing += per_token
        else:
            windows.append((per_token, int(window)))
    return KvShape(per_token=growing, windows=tuple(windows), per_row=per_row)


def _allocated(layer: Any) -> int:
    """Positions a layer's buffer holds (mlx-lm allocates them in steps): its keys' second-to-last axis."""
    keys = getattr(layer, "keys", None)
    if isinstance(keys, (tuple, list)):  # quantized: (values, scales, biases)
        keys = keys[0]
    return int(keys.shape[-2]) if isinstance(keys, mx.array) else 0
