"""How much memory a model needs, estimated from its files before loading it.

Weights: the safetensors files' sizes (the header is a few kilobytes of a file of
gigabytes). KV cache: keys and values for every layer at the context asked for,
from config.json. Refusing a load that cannot fit beats the OOM killer half-way.
No MLX here: the gateway uses it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_DTYPE_BYTES = 2
"""MLX keeps the KV cache in the model's activation dtype; half precision unless told otherwise."""


@dataclass(frozen=True)
class KvShape:
    """The cache one row of a batch holds, by kind of layer: full attention (and a latent attention's
    latent) grows with every token, a sliding window stops at its size, a recurrent state (gated delta
    net, Mamba) is the same at any length. Measured from a loaded model (worker/cache_shape.py)."""

    per_token: int
    """Bytes per token of the layers that keep every position."""
    windows: tuple[tuple[int, int], ...] = ()
    """(bytes per token, window size in tokens) of each windowed layer."""
    per_row: int = 0
    """Bytes of the states that do not grow."""

    def bytes_for(self, tokens: int) -> int:
        """Bytes of one row's cache holding `tokens` tokens."""
        windowed = sum(per_token * min(tokens, size) for per_token, size in self.windows)
        return self.per_token * tokens + windowed + (self.per_row if tokens > 0 else 0)


@dataclass(frozen=True)
class SizeEstimate:
    weights_bytes: int
    kv: KvShape

    def total(self, context_tokens: int) -> int:
        return self.weights_bytes + self.kv.bytes_for(context_tokens)


def estimate(directory: Path) -> SizeEstimate:
    """Estimate for a model directory holding config.json and *.safetensors."""
    weights = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    try:
        config: dict[str, Any] = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return SizeEstimate(weights_bytes=weights, kv=kv_shape(config))


def kv_shape(config: dict[str, Any]) -> KvShape:
    """What a row's cache holds, as far as config.json tells before loading: keys and values per token
    (2 x kv heads x head dim x dtype) for each layer of full attention, up to the window for each sliding
    one. Layers that keep a recurrent state instead (a gated delta net, Mamba) hold no positions; their
    state is counted once loaded (worker/cache_shape.py). A config that names no layer kinds has full
    attention in every layer."""
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 0) or 0)
    kv_heads = int(text.get("num_key_value_heads", heads) or heads)
    hidden = int(text.get("hidden_size", 0))
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    dtype = DTYPE_BYTES.get(str(text.get("torch_dtype", "")), DEFAULT_DTYPE_BYTES)
    per_layer = 2 * kv_heads * head_dim * dtype
    full, sliding = _attention_layers(text, layers)
    window = int(text.get("sliding_window") or 0)
    if not window:
        full, sliding = full + sliding, 0
    return KvShape(per_token=full * per_layer, windows=((per_layer, window),) * sliding)


def _attention_layers(text: dict[str, Any], layers: int) -> tuple[int, int]:
    """(full, sliding) attention layers, from the fields configs name them by."""
    kinds = text.get("layer_types")
    if isinstance(kinds, list) and kinds:
        named = [str(kind) for kind in kinds]
        sliding = sum("sliding" in kind for kind in named)
        return sum(kind in ("full_attention", "attention") for kind in named), sliding
    pattern = text.get("hybrid_override_pattern")
    if isinstance(pattern, (str, list)) and pattern:
        return sum(kind == "*" for kind in pattern), 0
    interval = int(text.get("full_attention_interval") or 0)
    if interval > 0:  # Qwen3-Next and Qwen3.5: linear attention, then full attention every interval
        return layers // interval, 0
    every = int(text.get("sliding_window_pattern") or 0)
    if every > 1:  # Gemma 3: sliding windows, then full attention every `every` layers
        return layers // every, layers - layers // every
    return layers, 0


def format_bytes(count: int) -> str:
    """Bytes for people: 1.5 GB, 340.2 MB, 12.0 kB."""
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"
