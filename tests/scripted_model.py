"""A real mlx-lm model whose greedy output is a chosen script, for what a random model cannot show
(reasoning, a tool call).

One qwen2 layer with every weight zero leaves the residual stream as the current token's
embedding; the untied output head's row for token B is the embedding of the token A the
script puts before it, so greedy decoding after A picks B. Each piece of the script is a
token of its own (added to the demo model's tokenizer), so no token repeats and every
step has one successor. The script starts after the generation prompt's last token and
ends with end-of-text.
"""

from __future__ import annotations

import json
from pathlib import Path

HIDDEN = 256
"""Wide enough that a token's own embedding outscores every other one by far (about 16 to 4)."""


def build_scripted_model(
    directory: Path,
    pieces: list[str],
    chat_template: str | None = None,
    special: tuple[str, ...] = (),
    prompt_end: str = "<|im_start|>assistant\n",
) -> Path:
    """A model in `directory` that answers any chat prompt with `pieces`, then ends; `chat_template`
    replaces the demo's (a family's own format), whose generation prompt ends as `prompt_end`, and
    `special` adds the family's special tokens to the vocabulary."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2
    from tokenizers import AddedToken, Tokenizer

    from worker.demo_model import CONFIG, build_tiny_model

    if (directory / "model.safetensors").exists():
        return directory
    build_tiny_model(directory)
    if chat_template is not None:
        settings = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": chat_template}))
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in pieces])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    ids = [tokenizer.token_to_id(piece) for piece in pieces]
    assert None not in ids and len(set(ids)) == len(ids), "each piece must be a token of its own"

    eos = int(CONFIG["eos_token_id"])
    chain = [tokenizer.encode(prompt_end).ids[-1], *ids, eos]

    shape = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 1, "vocab_size": vocab}
    config = {**CONFIG, **shape, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config, indent=2))

    mx.random.seed(7)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
    weights = {name: mx.zeros_like(value) for name, value in tree_flatten(model.parameters())}
    embed = mx.random.normal((vocab, HIDDEN))
    embed = embed / mx.linalg.norm(embed, axis=-1, keepdims=True)
    head = mx.zeros((vocab, HIDDEN))
    for before, after in zip(chain, chain[1:], strict=False):
        head[after] = embed[before]
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    weights["model.norm.weight"] = mx.ones((HIDDEN,))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    return directory


SPECIAL = ["It is", "<|fim_pad|>", " four."]
"""An answer with a special token inside it (added as one, as Qwen's `<|fim_pad|>` is): never in the text."""

THINKER = ["<think>", "Let me", " count.", "</think>", "It is", " four."]
"""Thinks, then answers."""

CALLER = ["<tool_call>", '{"name": "get_weather", ', '"arguments": ', '{"city": ', '"Par', 'is"}', "}", "</tool_call>"]
"""Calls get_weather for Paris, in the demo template's <tool_call> format."""


CODER = [
    "<tool_call>",
    "\n<function=get_weather>",
    "\n<parameter=city>",
    "\nParis",
    "\n</parameter>",
    "\n</function>",
    "\n</tool_call>",
]
"""Calls get_weather for Paris in Qwen3-Coder's XML format (mlx-lm's qwen3_coder parser reads it)."""

CODER_TEMPLATE = (
    # ChatML as Qwen3-Coder renders it: tools listed in the system turn, calls as XML.
    "{% if tools %}{{ '<|im_start|>system\\nYou have these functions:\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{% for call in message.tool_calls or [] %}"
    "{{ '<tool_call>\\n<function=' + call.function.name + '>\\n' }}"
    "{% for name, value in call.function.arguments.items() %}"
    "{{ '<parameter=' + name + '>\\n' + (value | string) + '\\n</parameter>\\n' }}"
    "{% endfor %}{{ '</function>\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


HARMONY_SPECIAL = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")
"""gpt-oss's special tokens: their presence says the model writes harmony (worker/harmony.py)."""

HARMONY_ANSWER = [
    "<|channel|>analysis<|message|>",
    "Let me",
    " count.",
    "<|end|><|start|>assistant<|channel|>final<|message|>",
    "It is",
    " four.",
    "<|return|>",
]
"""Reasons in the analysis channel, then answers in the final one (a piece per token: none repeats)."""

HARMONY_CALL = [
    "<|channel|>analysis<|message|>",
    "Weather needs",
    " a tool.",
    "<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
    '{"city": ',
    '"Paris"}',
    "<|call|>",
]
"""Reasons, then calls get_weather for Paris from the commentary channel."""

HARMONY_TEMPLATE = (
    # gpt-oss's message layout, trimmed: tools in a developer message, calls from the commentary channel.
    "{% if tools %}{{ '<|start|>developer<|message|># Tools\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}{{ '<|end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% for call in message.tool_calls or [] %}"
    "{{ '<|start|>assistant<|channel|>commentary to=functions.' + call.function.name }}"
    "{{ ' <|constrain|>json<|message|>' + (call.function.arguments | tojson) + '<|call|>' }}"
    "{% endfor %}"
    "{% if message['content'] %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|start|>functions to=assistant<|channel|>commentary<|message|>' + message['content'] + '<|end|>' }}"
    "{% else %}"
    "{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

GEMMA4_SPECIAL = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>', "<start_of_turn>")
"""Gemma 4's special tokens for thinking, calls and strings (mlx-lm infers its markers from them)."""

GEMMA4_CALL = [
    "<|channel>thought",
    "\nWeather needs",
    " a tool.",
    "<channel|>",
    "<|tool_call>",
    "call:get_weather{",
    'city:<|"|>Paris<|"|>',
    "}",
    "<tool_call|>",
]
"""Thinks in Gemma 4's thought channel, then calls get_weather in its own call syntax."""

GEMMA4_TEMPLATE = (
    # Gemma's turns, with Gemma 4's tool declarations and calls as its template writes them.
    "{% if tools %}{{ '<start_of_turn>system\\n' }}"
    "{% for tool in tools %}{{ '<|tool>' + (tool | tojson) + '<tool|>' }}{% endfor %}"
    "{{ '<end_of_turn>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (message['content'] or '') }}"
    "{% for call in message.tool_calls or [] %}"
    "{{ '<|tool_call>call:' + call.function.name + (call.function.arguments | tojson) + '<tool_call|>' }}"
    "{% endfor %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
