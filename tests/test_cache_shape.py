"""Every kind of cache mlx-lm gives today's families, in the engine (in-process, real models): what
the ledger counts, where a kept state resumes, and rows batched as alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlx_lm import load

from shared.models import ModelSpec
from shared.schemas import GenerateRequest
from shared.settings import Settings
from shared.sizing import KvShape, kv_shape
from worker.assembly import build_engine
from worker.cache_shape import cuttable, measure, recurrent
from worker.engine import Engine
from worker.generation import Submission
from worker.rows import Outcome
from worker.tiny_families import FAMILIES, SLIDING_WINDOW, build_family_model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_family_model(root / family, family) for family in FAMILIES}


def engine_with(prefix_cache_bytes: int) -> Engine:
    running = build_engine(Settings(), 10**10, prefix_cache_bytes=prefix_cache_bytes)
    running.start()
    return running


@pytest.fixture
def engines() -> Iterator[tuple[Engine, Engine]]:
    """One engine that keeps prefixes and one that computes every prompt from scratch."""
    keeping, scratch = engine_with(10**9), engine_with(0)
    yield keeping, scratch
    keeping.stop()
    scratch.stop()


def run(engine: Engine, spec: ModelSpec, bodies: list[dict[str, Any]]) -> list[Outcome]:
    handles = []
    for n, body in enumerate(bodies):
        request = GenerateRequest.model_validate(
            {"model": spec.name, "max_tokens": 10, "temperature": 0, "logprobs": True, **body}
        )
        handles.append(engine.submit(Submission(job_id=f"{spec.name}-{n}-{id(body)}", request=request, spec=spec)))
    for handle in handles:
        assert handle.wait(120)
    return [handle.result() for handle in handles]


def logprobs(outcome: Outcome) -> list[float]:
    return [entry["logprob"] for entry in outcome.logprobs or []]


def test_the_ledger_counts_each_kind_of_layer_as_it_grows(built: dict[str, Path]) -> None:
    plain, _ = load(str(built["llama"]))
    windowed, _ = load(str(built["gemma3_text"]))
    hybrid, _ = load(str(built["qwen3_next"]))
    latent, _ = load(str(built["deepseek_v3"]))
    # llama: 2 layers x (keys + values) x 2 kv heads x 16 dims x 4 bytes
    assert measure(plain) == KvShape(per_token=2 * 2 * 2 * 16 * 4)
    # gemma3_text: one full-attention layer, two windows that stop at their size
    shape = measure(windowed)
    assert shape.per_token == 2 * 2 * 16 * 4 and shape.windows == ((2 * 2 * 16 * 4, SLIDING_WINDOW),) * 2
    assert shape.bytes_for(10_000) - shape.bytes_for(5_000) == 5_000 * shape.per_token
    # qwen3_next: one attention layer, one gated delta net whose state is the same at any length
    shape = measure(hybrid)
    assert shape.per_token == 2 * 2 * 16 * 4 and shape.per_row > 0 and not shape.windows
    # deepseek_v3: latent attention stores less per token than heads x dims would
    assert 0 < measure(latent).per_token < 2 * 2 * 4 * (16 + 8) * 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_estimate_before_loading_counts_the_layers_that_grow_as_the_loaded_model_does(
    built: dict[str, Path], family: str
) -> None:
    """The fit check before a load reads config.json: full attention per token, windows to their size, no
    positions for recurrent layers; latent attention (DeepSeek) stores less than it says, never more."""
    before = kv_shape(json.loads((built[family] / "config.json").read_text()))
    model, _ = load(str(built[family]))
    after = measure(model)
    if family == "deepseek_v3":
        assert before.per_token > after.per_token and not before.windows
    else:
        assert (before.per_token, before.windows) == (after.per_token, after.windows)


def test_each_family_says_what_its_cache_can_do(built: dict[str, Path]) -> None:
    kinds = {}
    for family, path in built.items():
        model, _ = load(str(path))
        fresh = model.make_cache() if hasattr(model, "make_cache") else [None]
        kinds[family] = (cuttable(fresh), recurrent(fresh)) if fresh != [None] else (True, False)
    assert kinds["llama"] == kinds["qwen3"] == kinds["deepseek_v3"] == (True, False)
    assert kinds["gemma3_text"] == kinds["gpt_oss"] == (False, False)
    assert kinds["qwen3_next"] == kinds["qwen3_5"] == kinds["nemotron_h"] == (False, True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_turns_resumed_from_kept_states_answer_as_computed_from_scratch(
    engines: tuple[Engine, Engine], built: dict[str, Path], family: str
) -> None:
    keeping, scratch = engines
    spec = ModelSpec(family, path=built[family])
    messages: list[dict[str, str]] = [{"role": "system", "content": "You help a team run local models. " * 40}]
    previous = 0
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question {turn}: where are the settings?"})
        [resumed] = run(keeping, spec, [{"messages": messages}])
        [computed] = run(scratch, spec, [{"messages": messages}])
        assert computed.cached_tokens == 0
        assert resumed.cached_tokens >= 0.9 * previous
        assert resumed.text == computed.text
        assert logprobs(resumed) == pytest.approx(logprobs(computed), abs=1e-3)
        previous = resumed.prompt_tokens
        messages.append({"role": "assistant", "content": resumed.text})


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_next"])
def test_sessions_with_one_system_prompt_share_it_where_caches_cannot_be_cut(
    engines: tuple[Engine, Engine], built: dict[str, Path], family: str
) -> None:
    """A wrapped window or a recurrent state cannot be cut back to where two sessions part: the state
    at the end of the system messages is kept on the way, and the second session starts from it."""
    keeping, scratch = engines
    spec = ModelSpec(family, path=built[family])
    system = {"role": "system", "content": "You help a team run local models. " * 40}
    first, second = ({"messages": [system, {"role": "user", "content": ask}]} for ask in ("Hi there", "Bonjour"))
    [one] = run(keeping, spec, [first])
    [two] = run(keeping, spec, [second])
    [computed] = run(scratch, spec, [second])
    assert one.cached_tokens == 0
    assert two.cached_tokens >= 0.9 * (two.prompt_tokens - 12)  # all but the user's turn and what follows
    assert two.text == computed.text


def test_mamba_rows_prefilled_beside_a_longer_prompt_answer_as_alone(built: dict[str, Path]) -> None:
    """mlx-lm pads a prompt batch's rows to the longest, and its batched Mamba2 layers are not exact
    over that padding (first logprobs ~3e-2 off): such rows are prefilled one at a time."""
    engine = engine_with(0)  # nothing kept: every row is prefilled in the batch
    try:
        spec = ModelSpec("nemotron_h", path=built["nemotron_h"])
        bodies = [{"prompt": "Hello there " * n} for n in (1, 2, 40, 3)]
        alone = [run(engine, spec, [body])[0] for body in bodies]
        together = run(engine, spec, bodies)
        for one, beside in zip(alone, together, strict=True):
            assert logprobs(beside) == pytest.approx(logprobs(one), abs=1e-4)
    finally:
        engine.stop()


def test_an_unexpected_error_in_a_turn_fails_its_batch_and_the_engine_serves_on(built: dict[str, Path]) -> None:
    engine = engine_with(10**9)
    try:
        spec = ModelSpec("llama", path=built["llama"])
        piece = engine.runner._next_piece
        failures = iter([RuntimeError("a cache that answers nothing we know")])

        def failing_once() -> int:
            error = next(failures, None)
            if error is not None:
                raise error
            return piece()

        engine.runner._next_piece = failing_once  # type: ignore[method-assign]
        request = GenerateRequest.model_validate({"model": "llama", "prompt": "Hello", "max_tokens": 4})
        handle = engine.submit(Submission(job_id="first", request=request, spec=spec))
        assert handle.wait(60)
        with pytest.raises(Exception, match="a cache that answers nothing we know"):
            handle.result()
        assert engine.alive
        [after] = run(engine, spec, [{"prompt": "Hello again"}])
        assert after.completion_tokens > 0
    finally:
        engine.stop()
