"""The built-in models: real files, real mlx-lm loading, built offline. `tiny` in under a second;
`demo` counting like a real model, with answers that end."""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from worker.demo_model import DEMO_CONTEXT, build_demo_model, build_tiny_model

ENGLISH = (
    "You are an interactive command line tool that helps users with software engineering tasks. Use the "
    "instructions below and the tools available to you to assist the user. When you are not sure what the "
    "user wants, ask a short question before you change any file, and keep your answers brief and direct."
)


def test_tiny_model_builds_in_under_a_second_and_loads_with_mlx_lm(tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "warm-up")  # imports are not the builder's cost
    started = time.perf_counter()
    path = build_tiny_model(tmp_path / "tiny")
    assert time.perf_counter() - started < 1.0

    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2"
    tokenizer_json = json.loads((path / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["type"] == "BPE"
    assert tokenizer_json["pre_tokenizer"]["type"] == "ByteLevel"

    model, tokenizer = mlx_lm.load(str(path))[:2]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello, world!"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    # Byte-level BPE round-trips any text, non-ASCII included.
    assert tokenizer.decode(tokenizer.encode("héllo wörld ✓")) == "héllo wörld ✓"
    assert mlx_lm.generate(model, tokenizer, prompt, max_tokens=5) is not None


def test_building_twice_reuses_the_first_build(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "tiny")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(tmp_path / "tiny")
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo")


def test_demo_counts_english_and_code_as_a_real_tokenizer_does(demo: Path) -> None:
    model, tokenizer = mlx_lm.load(str(demo))[:2]
    config = json.loads((demo / "config.json").read_text())
    assert config["max_position_embeddings"] == DEMO_CONTEXT == 131072
    assert config["vocab_size"] > 32_000
    english = len(ENGLISH) / len(tokenizer.encode(ENGLISH))
    code_text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    code = len(code_text) / len(tokenizer.encode(code_text))
    assert 3.5 < english < 6 and 3 < code < 6, (english, code)
    assert tokenizer.decode(tokenizer.encode("héllo wörld ✓")) == "héllo wörld ✓"


def test_demo_renders_system_text_and_tools_as_qwen_does(demo: Path) -> None:
    tokenizer = mlx_lm.load(str(demo))[1]
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Read it."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "read_file", "arguments": {}}}]},
        {"role": "tool", "content": "the file"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "read_file"' in text
    assert '<tool_call>\n{"name": "read_file", "arguments": {}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nthe file\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_demo_answers_end_and_differ(demo: Path) -> None:
    """Random weights with a 32,000-token vocabulary would never end an answer (worker/demo_answers.py)."""
    model, tokenizer = mlx_lm.load(str(demo))[:2]
    lengths, texts = [], set()
    for temperature in (0.0, 1.0):
        for i in range(4):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Question {i}: what now?"}], add_generation_prompt=True
            )
            tokens = [
                r.token for r in stream_generate(model, tokenizer, prompt, 1000, sampler=make_sampler(temperature))
            ]
            lengths.append(len(tokens))
            texts.add(tokenizer.decode(tokens))
    assert all(length < 1000 for length in lengths), lengths
    assert len(texts) > 1
