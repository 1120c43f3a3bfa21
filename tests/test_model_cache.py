"""The model cache under a small budget, with tiny real models of known, different sizes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator

from shared import sizing
from shared.errors import InsufficientMemory
from shared.models import ModelSpec
from shared.schemas import GenerateRequest
from shared.settings import Settings
from worker.assembly import build_engine
from worker.demo_model import build_tiny_model
from worker.engine import Engine
from worker.generation import Submission
from worker.kv_manager import KVCacheManager
from worker.ledger import MemoryLedger
from worker.model_cache import ModelCache

CONTEXT = 64  # tokens of KV headroom asked for in these tests


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    root = tmp_path_factory.mktemp("models")
    specs = {name: ModelSpec(name, path=build_tiny_model(root / name)) for name in ("a", "b", "c")}
    specs["big"] = ModelSpec("big", path=build_tiny_model(root / "big", hidden_size=256, intermediate_size=512))
    return specs


def need(spec: ModelSpec) -> int:
    assert spec.path is not None
    return sizing.estimate(spec.path).total(CONTEXT)


class Probe:
    """A memory probe the test sets, standing in for psutil."""

    def __init__(self) -> None:
        self.percent = 40.0

    def __call__(self) -> float:
        return self.percent


def cache_for(models: dict[str, ModelSpec], fits: int, probe: Probe | None = None, **settings: Any) -> ModelCache:
    """A cache whose budget holds `fits` of the small models, not one more."""
    budget = int(need(models["a"]) * (fits + 0.5))
    return ModelCache(Settings(**settings), MemoryLedger(budget, KVCacheManager(0)), probe or Probe())


def use(cache: ModelCache, spec: ModelSpec) -> None:
    cache.acquire(spec, CONTEXT)
    cache.release(spec.name)
    time.sleep(0.01)  # distinct last-used times


def test_the_big_model_really_is_bigger(models: dict[str, ModelSpec]) -> None:
    assert need(models["big"]) > 4 * need(models["a"])


def test_lru_evicts_the_least_recently_used_idle_model(models: dict[str, ModelSpec]) -> None:
    cache = cache_for(models, fits=2)
    use(cache, models["a"])
    use(cache, models["b"])
    use(cache, models["a"])
    use(cache, models["c"])
    assert cache.loaded_names() == ["a", "c"]
    assert cache.ledger.held_bytes <= cache.ledger.budget_bytes


def test_a_serving_model_is_never_evicted_and_the_load_fails_with_what_is_held(models: dict[str, ModelSpec]) -> None:
    cache = cache_for(models, fits=2)
    cache.acquire(models["a"], CONTEXT)
    cache.acquire(models["b"], CONTEXT)
    with pytest.raises(InsufficientMemory) as caught:
        cache.acquire(models["c"], CONTEXT)
    message = caught.value.message
    assert "model 'c' needs about" in message
    assert "a (" in message and "1 active request" in message
    assert cache.loaded_names() == ["a", "b"]
    # Once one of them is released, the same load goes through by evicting it.
    cache.release("a")
    cache.acquire(models["c"], CONTEXT)
    assert cache.loaded_names() == ["b", "c"]


def test_a_model_bigger_than_the_whole_budget_fails_at_once_with_the_sizes(models: dict[str, ModelSpec]) -> None:
    cache = cache_for(models, fits=2)
    use(cache, models["a"])
    started = time.perf_counter()
    with pytest.raises(InsufficientMemory) as caught:
        cache.acquire(models["big"], CONTEXT)
    assert time.perf_counter() - started < 0.5
    message = caught.value.message
    assert "model 'big' needs about" in message
    assert sizing.format_bytes(cache.ledger.budget_bytes) in message
    assert "whole budget" in message
    assert cache.loaded_names() == ["a"]  # nothing was evicted for a load that could never fit


def test_memory_thresholds_evict_by_level_and_block_loads_when_critical(models: dict[str, ModelSpec]) -> None:
    probe = Probe()
    cache = cache_for(models, fits=3, probe=probe)
    for name in ("a", "b", "c"):
        use(cache, models[name])

    probe.percent = 86.0  # warning: down to the most recently used
    cache.maintain()
    assert cache.loaded_names() == ["c"]

    use(cache, models["a"])
    probe.percent = 96.0  # critical: every idle model goes, and no load starts
    cache.maintain()
    assert cache.loaded_names() == []
    with pytest.raises(InsufficientMemory, match="96.0 %"):
        cache.acquire(models["b"], CONTEXT)

    probe.percent = 99.0  # emergency: the same here (the gateway stops admitting, tested there)
    with pytest.raises(InsufficientMemory):
        cache.acquire(models["b"], CONTEXT)

    probe.percent = 50.0
    use(cache, models["b"])
    assert cache.loaded_names() == ["b"]


def test_a_serving_model_survives_the_critical_level(models: dict[str, ModelSpec]) -> None:
    probe = Probe()
    cache = cache_for(models, fits=3, probe=probe)
    cache.acquire(models["a"], CONTEXT)
    use(cache, models["b"])
    probe.percent = 97.0
    cache.maintain()
    assert cache.loaded_names() == ["a"]


def test_unloading_every_model_gives_mlx_memory_back(models: dict[str, ModelSpec]) -> None:
    cache = ModelCache(Settings(), MemoryLedger(10**9, KVCacheManager(0)), Probe())
    mx.clear_cache()
    before = mx.get_active_memory()
    for name in ("a", "b", "big"):
        use(cache, models[name])
    loaded = mx.get_active_memory()
    assert loaded - before >= sizing.estimate(models["big"].path).weights_bytes  # type: ignore[arg-type]
    assert cache.unload_idle(keep=0, reason="test") == ["a", "b", "big"]
    after = mx.get_active_memory()
    assert abs(after - before) <= 0.05 * max(before, loaded - before), (before, loaded, after)


def request(**body: Any) -> GenerateRequest:
    return GenerateRequest.model_validate({"model": "a", "prompt": "Hello", **body})


@pytest.fixture
def engine(models: dict[str, ModelSpec]) -> Iterator[Engine]:
    budget = int(need(models["a"]) * 3.5)
    running = build_engine(Settings(keep_alive_s=1, maintenance_interval_s=0.1), budget, Probe(), prefix_cache_bytes=0)
    running.start()
    yield running
    running.stop()


def run(engine: Engine, spec: ModelSpec, job_id: str, **body: Any) -> Any:
    handle = engine.submit(Submission(job_id=job_id, request=request(max_tokens=8, **body), spec=spec))
    assert handle.wait(30)
    return handle


def test_an_allocation_failure_during_generation_fails_that_job_only(
    engine: Engine, models: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_next = BatchGenerator.next
    steps = 0

    def failing_next(self: BatchGenerator) -> Any:
        nonlocal steps
        steps += 1
        if steps > 2:
            raise RuntimeError("[malloc] Unable to allocate 1099511627776 bytes")
        return real_next(self)

    monkeypatch.setattr(BatchGenerator, "next", failing_next)
    failed = run(engine, models["a"], "doomed", ignore_eos=True)
    with pytest.raises(InsufficientMemory, match="Memory ran out while generating"):
        failed.result()
    assert engine.cache.loaded_names() == []  # emergency cleanup

    monkeypatch.setattr(BatchGenerator, "next", real_next)
    assert run(engine, models["a"], "fine", ignore_eos=True).result().completion_tokens == 8


def test_an_idle_model_is_unloaded_after_keep_alive(engine: Engine, models: dict[str, ModelSpec]) -> None:
    run(engine, models["b"], "once").result()
    assert engine.cache.loaded_names() == ["b"]
    deadline = time.monotonic() + 5
    while engine.cache.loaded_names() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.cache.loaded_names() == []


def test_an_unload_request_runs_on_the_engine_thread(engine: Engine, models: dict[str, ModelSpec]) -> None:
    run(engine, models["c"], "once").result()
    engine.request_unload("c")
    deadline = time.monotonic() + 2
    while engine.cache.loaded_names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cache.loaded_names() == []


def test_a_failed_generation_does_not_pin_its_model_in_memory(models: dict[str, ModelSpec]) -> None:
    engine = build_engine(Settings(maintenance_interval_s=0.1), 10**9, Probe(), prefix_cache_bytes=0)
    engine.start()
    try:
        mx.clear_cache()
        before = mx.get_active_memory()
        big = models["big"]
        handle = engine.submit(
            Submission(job_id="stopped", request=request(model="big", max_tokens=30_000, ignore_eos=True), spec=big)
        )  # fmt: skip
        time.sleep(0.3)
        engine.cancel("stopped")
        assert handle.wait(5)
        engine.request_unload("big")
        deadline = time.monotonic() + 5
        while engine.cache.loaded_names() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The handle and its error are still alive, as they are in the worker while RQ records the failure.
        assert handle._error is not None
        assert mx.get_active_memory() - before < 0.05 * need(big)
    finally:
        engine.stop()
