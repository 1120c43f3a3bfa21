"""The built-in demo model: real files, real mlx-lm loading, built fast and offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx_lm

from worker.demo_model import build_demo_model


def test_demo_model_builds_in_under_a_second_and_loads_with_mlx_lm(tmp_path: Path) -> None:
    build_demo_model(tmp_path / "warm-up")  # imports are not the builder's cost
    started = time.perf_counter()
    path = build_demo_model(tmp_path / "demo")
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
    path = build_demo_model(tmp_path / "demo")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    build_demo_model(tmp_path / "demo")
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
