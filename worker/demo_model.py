"""The built-in models: random weights in the shape of a real qwen2 checkpoint, built offline on first use.

Each has config.json, model.safetensors, a byte-level BPE tokenizer.json and a ChatML
chat template, so everything downstream runs the same code as for a 70B model:

- `demo` counts like a real model (worker/demo_tokenizer.py: a 32,000-token vocabulary
  learnt from Python's own sources, about four characters a token of English, a
  128k context, Qwen2.5's rendering of system text and tools): agent clients' long
  prompts fit it as they fit the models teams run. `scripts/run` serves it.
- `tiny` is fast to build and to count (a 512-entry vocabulary, a 32k context): the
  tests' model, and the base of the test families and scripted models.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker import demo_answers, demo_tokenizer

logger = logging.getLogger(__name__)

DEMO = "demo"
TINY = "tiny"
EMBED = "embed"

TINY_CONTEXT = 32768
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
SEED = 20261122

# The tiny model's: ChatML, as Qwen2 ships it, trimmed of tool handling.
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

# The tiny tokenizer is trained on this text so that common English words get merges;
# it is the only corpus the tiny model ever sees.
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
    "max_position_embeddings": TINY_CONTEXT,
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

    demo_tokenizer.write_chatml_config(directory, CHAT_TEMPLATE, TINY_CONTEXT)


Shaping = Callable[[dict[str, Any]], dict[str, Any]]
"""What becomes of a model's random weights before they are saved."""


def _write_weights(
    directory: Path, config: dict[str, Any], shaping: Shaping | None = None, library: str = "mlx_lm"
) -> None:
    """Random weights for `library`'s own class of the config's `model_type` (mlx-lm's, or mlx-embeddings'
    for an embedding model), saved as it loads them."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    architecture = importlib.import_module(f"{library}.models.{config['model_type']}")
    mx.random.seed(SEED)
    args = architecture.ModelArgs.from_dict(config)
    model = architecture.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    if shaping is not None:
        weights = shaping(weights)
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})


DEMO_CONTEXT = 131072
DEMO_CONFIG = {**CONFIG, "num_hidden_layers": 1, "max_position_embeddings": DEMO_CONTEXT, "tie_word_embeddings": False}
"""The demo's shape: the tiny one's layers, with a 128k context, its own vocabulary's size and an output
head of its own (worker/demo_answers.py)."""


def build_builtin(name: str, directory: Path) -> Path:
    """Build the built-in model `name` into `directory` unless it is already there; return it."""
    builders: dict[str, Callable[[Path], Path]] = {
        DEMO: build_demo_model,
        TINY: build_tiny_model,
        EMBED: build_embedding_model,
    }
    return builders[name](directory)


def build_tiny_model(directory: Path, **config_overrides: Any) -> Path:
    """Build the tiny model into `directory` unless it is already there; return it.

    `config_overrides` (e.g. `hidden_size=256`) make other tiny models of known,
    different sizes with the same tokenizer; the built-in one uses none. With a
    `model_type` among them, another architecture of mlx-lm's (worker/tiny_families.py).
    """
    config = {**CONFIG, **config_overrides}
    return _build(directory, config, lambda staging: _write_tokenizer(staging))


EMBED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
}
"""The built-in embedding model: a BERT of mlx-embeddings' own class, 128-dimensional vectors, 512 tokens."""


def build_embedding_model(directory: Path, **config_overrides: Any) -> Path:
    """Build the built-in embedding model (random weights, the demo's tokenizer) into `directory` unless it is
    already there; `config_overrides` (e.g. `hidden_size=384`) make others of known sizes (scripts/bench)."""
    config = {**EMBED_CONFIG, **config_overrides}

    def tokenizer(staging: Path) -> None:
        size = demo_tokenizer.write_tokenizer(staging, int(config["max_position_embeddings"]))
        (staging / "config.json").write_text(json.dumps({**config, "vocab_size": size}, indent=2))

    return _build(directory, config, tokenizer, library="mlx_embeddings")


def build_demo_model(directory: Path) -> Path:
    """Build the demo model (worker/demo_tokenizer.py, worker/demo_answers.py) into `directory` unless it
    is already there."""
    vocab: list[str] = []

    def tokenizer(staging: Path) -> None:
        from tokenizers import Tokenizer

        size = demo_tokenizer.write_tokenizer(staging, DEMO_CONTEXT)
        written = Tokenizer.from_file(str(staging / "tokenizer.json"))
        vocab.extend(written.id_to_token(i) or "" for i in range(size))
        config = {**DEMO_CONFIG, "vocab_size": size, "eos_token_id": written.token_to_id("<|im_end|>")}
        (staging / "config.json").write_text(json.dumps(config, indent=2))

    def shaping(weights: dict[str, Any]) -> dict[str, Any]:
        return demo_answers.shape(weights, vocab, vocab.index("<|im_end|>"), SEED)

    return _build(directory, DEMO_CONFIG, tokenizer, shaping)


def _build(
    directory: Path,
    config: dict[str, Any],
    write_tokenizer: Callable[[Path], None],
    shaping: Shaping | None = None,
    library: str = "mlx_lm",
) -> Path:
    with _building[directory]:  # a second caller in this process waits for the first's build
        return _build_once(directory, config, write_tokenizer, shaping, library)


_building: defaultdict[Path, threading.Lock] = defaultdict(threading.Lock)


def _build_once(
    directory: Path,
    config: dict[str, Any],
    write_tokenizer: Callable[[Path], None],
    shaping: Shaping | None,
    library: str,
) -> Path:
    if (directory / "model.safetensors").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=directory.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(staging)  # it may settle the vocabulary's size in the config
        _write_weights(staging, json.loads((staging / "config.json").read_text()), shaping, library)
        try:
            os.rename(staging, directory)
        except OSError:
            # Another process built it first; theirs is as good as ours.
            if not (directory / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built a built-in model", extra={"path": str(directory)})
    return directory
