"""The built-in `demo` model: tiny, random weights, built offline on first use.

It has the shape of a real qwen2 checkpoint (config.json, model.safetensors, a
byte-level BPE tokenizer.json and a ChatML chat template) so that everything
downstream runs the same code as for a 70B model, just faster.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
SEED = 20261122

# ChatML, as Qwen2 ships it, trimmed of tool handling.
CHAT_TEMPLATE = (
    # Tools as Hermes/Qwen-style templates render them: listed in a system turn, called as
    # <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
    "{% if tools %}{{ '<|im_start|>system\\nYou may call these tools:\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    '{{ \'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>\\n\' }}{% endif %}'
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% for call in message.tool_calls or [] %}"
    "{{ '<tool_call>' + (call.function | tojson) + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The tokenizer is trained on this text so that common English words get merges;
# it is the only corpus the demo model ever sees.
_CORPUS = """
mlxq is a queue-based inference service. Requests become durable jobs in Redis,
admitted or refused up front, and drained by one long-lived worker per machine.
The worker keeps models in memory under a budget and refuses what cannot fit.
A watchdog restarts workers that die or hang, with backoff and a circuit breaker.
Hello, world! The quick brown fox jumps over the lazy dog. 0123456789
Write a short poem about the sea. Summarise the following text in one sentence.
You are a helpful assistant. What is the capital of France? Paris is the capital.
"""

CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32768,
    "vocab_size": VOCAB_SIZE,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": VOCAB_SIZE - len(SPECIAL_TOKENS) + 2,  # <|im_end|>
    "torch_dtype": "float32",
}


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # Pad the vocabulary so the special tokens land on fixed ids at the top.
    missing = VOCAB_SIZE - len(SPECIAL_TOKENS) - tokenizer.get_vocab_size()
    tokenizer.add_tokens([f"<|pad{i}|>" for i in range(missing)])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert tokenizer.token_to_id("<|im_end|>") == CONFIG["eos_token_id"]
    tokenizer.save(str(directory / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def _write_weights(directory: Path, config: dict[str, Any]) -> None:
    """Random weights for mlx-lm's own class of the config's `model_type`, saved as it loads them."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    architecture = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(SEED)
    args = architecture.ModelArgs.from_dict(config)
    model = architecture.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})


def build_demo_model(directory: Path, **config_overrides: Any) -> Path:
    """Build the demo model into `directory` unless it is already there; return it.

    `config_overrides` (e.g. `hidden_size=256`) make other tiny models of known,
    different sizes with the same tokenizer; the built-in demo uses none. With a
    `model_type` among them, another architecture of mlx-lm's (worker/tiny_families.py).
    """
    if (directory / "model.safetensors").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, **config_overrides}
    # Build beside the target and rename, so a crash never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=directory.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(staging)
        _write_weights(staging, config)
        try:
            os.rename(staging, directory)
        except OSError:
            # Another process built it first; theirs is as good as ours.
            if not (directory / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built demo model", extra={"path": str(directory)})
    return directory
