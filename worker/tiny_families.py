"""Tiny random-weight models of the families teams run, built offline like `demo`.

Each is mlx-lm's own model class for the family's `model_type`, with the demo's
tokenizer and chat template, and a config in which every kind of layer the
family has is present: full attention beside sliding windows (Gemma, gpt-oss),
beside gated delta nets (Qwen3.5, Qwen3-Next) or Mamba layers (Nemotron-H),
latent attention (DeepSeek-V3), experts (Qwen3-MoE). They exist so that tests and
`scripts/bench` run every kind of cache mlx-lm gives a model, in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.demo_model import build_tiny_model

SLIDING_WINDOW = 64
"""Tokens a window layer sees: small, so a chat of a few hundred tokens wraps it."""

_ATTENTION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}

_GATED_DELTA = {
    "num_hidden_layers": 2,
    "full_attention_interval": 2,  # a gated delta net first, then full attention
    "head_dim": 16,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "num_hidden_layers": 2, **_ATTENTION},
    "qwen3": {"model_type": "qwen3", "num_hidden_layers": 2, "head_dim": 16, **_ATTENTION},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 2,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        **_ATTENTION,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "num_hidden_layers": 3,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": SLIDING_WINDOW,
        "sliding_window_pattern": 3,  # two window layers, then one of full attention
        **_ATTENTION,
    },
    "gpt_oss": {
        "model_type": "gpt_oss",
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 16,
        "sliding_window": SLIDING_WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
        **_ATTENTION,
    },
    "qwen3_next": {
        "model_type": "qwen3_next",
        **_GATED_DELTA,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "partial_rotary_factor": 0.5,
        **_ATTENTION,
    },
    "qwen3_5": {
        "model_type": "qwen3_5",
        **_GATED_DELTA,
        **_ATTENTION,
    },
    "nemotron_h": {
        "model_type": "nemotron_h",
        "hybrid_override_pattern": ["M", "*", "-"],  # Mamba, attention, MLP
        "num_hidden_layers": 3,
        "head_dim": 16,
        "attention_bias": False,
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "mamba_proj_bias": False,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        **_ATTENTION,
    },
}


def build_family_model(directory: Path, family: str, **overrides: Any) -> Path:
    """The tiny model of `family` (a key of FAMILIES) in `directory`, built unless it is there;
    `overrides` change its config (a larger `hidden_size` for the bench)."""
    return build_tiny_model(directory, architectures=[], **{**FAMILIES[family], **overrides})
