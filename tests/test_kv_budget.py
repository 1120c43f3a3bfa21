"""The running batch's KV cache and the kept prefixes count against the model budget (in-process
engine, real demo model)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from shared import sizing
from shared.errors import ExceedsMemoryBudget, JobTimedOut
from shared.models import ModelSpec
from shared.schemas import GenerateRequest
from shared.settings import Settings
from worker.assembly import build_engine
from worker.engine import Engine
from worker.generation import Submission

LONG_PROMPT = " ".join(f"note {i}: the river was high on day {i}." for i in range(30))


class Probe:
    """System memory as the test sets it, one reading after another (the last one repeats)."""

    def __init__(self, *readings: float) -> None:
        self.readings = list(readings) or [40.0]

    def __call__(self) -> float:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    spec = ModelSpec("tiny", path=tmp_path_factory.mktemp("kv") / "tiny", builtin=True)
    from worker.demo_model import build_tiny_model

    assert spec.path is not None
    build_tiny_model(spec.path)
    return spec


def sizes(spec: ModelSpec) -> sizing.SizeEstimate:
    assert spec.path is not None
    return sizing.estimate(spec.path)


def submission(spec: ModelSpec, job_id: str, max_tokens: int, **body: Any) -> Submission:
    request = GenerateRequest.model_validate(
        {"model": spec.name, "prompt": "Hi", "temperature": 0, "max_tokens": max_tokens, **body}
    )
    return Submission(job_id=job_id, request=request, spec=spec)


def engine_with(budget: int, probe: Probe | None = None, prefix_bytes: int = 0) -> Engine:
    settings = Settings(maintenance_interval_s=0.05, max_batch=16)
    engine = build_engine(settings, budget, probe or Probe(), prefix_cache_bytes=prefix_bytes)
    engine.start()
    return engine


def test_a_context_that_could_never_fit_fails_at_once_naming_max_tokens(demo: ModelSpec) -> None:
    size = sizes(demo)
    engine = engine_with(size.weights_bytes + size.kv.per_token * 300)
    try:
        handle = engine.submit(submission(demo, "huge", max_tokens=5000))
        assert handle.wait(10)
        with pytest.raises(ExceedsMemoryBudget) as refused:
            handle.result()
        assert refused.value.to_dict()["code"] == "insufficient_memory"
        assert refused.value.param == "max_tokens"
        assert refused.value.headers()["x-should-retry"] == "false"
        # A context that fits still runs on the same engine.
        small = engine.submit(submission(demo, "small", max_tokens=8))
        assert small.wait(30) and small.result().completion_tokens > 0
    finally:
        engine.stop()


def test_a_row_that_does_not_fit_beside_the_running_one_waits_for_it(demo: ModelSpec) -> None:
    size = sizes(demo)
    # Room for one row of 200 positions, not two.
    engine = engine_with(size.weights_bytes + size.kv.per_token * 300)
    seen: dict[str, list[float]] = {"first": [], "second": []}
    try:
        handles = []
        for job_id in seen:
            sub = submission(demo, job_id, max_tokens=195, ignore_eos=True)
            sub.on_text = lambda _piece, job_id=job_id: seen[job_id].append(time.monotonic())
            handles.append(engine.submit(sub))
        for handle in handles:
            assert handle.wait(60)
            assert handle.result().completion_tokens == 195
        assert seen["first"] and seen["second"]
        assert min(seen["second"]) > max(seen["first"]), "the second row ran beside the first"
        assert engine.cache.ledger.kv_bytes == 0
    finally:
        engine.stop()


def test_rows_that_fit_together_run_together_and_their_kv_is_counted(demo: ModelSpec) -> None:
    size = sizes(demo)
    engine = engine_with(size.weights_bytes + size.kv.per_token * 2000)
    held: list[int] = []
    try:
        subs = [submission(demo, f"r{i}", max_tokens=100, ignore_eos=True) for i in range(4)]
        subs[0].on_text = lambda _piece: held.append(engine.cache.ledger.kv_bytes)
        handles = [engine.submit(sub) for sub in subs]
        for handle in handles:
            assert handle.wait(60)
        assert max(held) >= 4 * 100 * size.kv.per_token
        assert engine.cache.ledger.kv_bytes == 0
    finally:
        engine.stop()


def test_past_the_warning_threshold_kept_prefixes_go_before_any_model(demo: ModelSpec) -> None:
    size = sizes(demo)
    # The first reading after a prefix is kept is past the warning level; once they are dropped it is not.
    probe = Probe(40.0)
    engine = engine_with(size.weights_bytes * 4, probe, prefix_bytes=10**8)
    try:
        handle = engine.submit(submission(demo, "kept", max_tokens=4, prompt=LONG_PROMPT))
        assert handle.wait(30) and handle.result()
        assert engine.cache.ledger.kept_bytes > 0
        probe.readings = [90.0, 60.0]
        deadline = time.monotonic() + 5
        while engine.cache.ledger.kept_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.cache.ledger.kept_bytes == 0
        assert engine.cache.loaded_names() == ["tiny"]
    finally:
        engine.stop()


def test_kept_prefixes_count_in_what_the_cache_holds(demo: ModelSpec, tmp_path: Path) -> None:
    size = sizes(demo)
    engine = engine_with(size.weights_bytes * 4, prefix_bytes=10**8)
    try:
        handle = engine.submit(submission(demo, "kept", max_tokens=4, prompt=LONG_PROMPT))
        assert handle.wait(30) and handle.result()
        assert engine.cache.ledger.kept_bytes > 0
        assert engine.cache.ledger.held_bytes == engine.cache.ledger.weights_bytes + engine.cache.ledger.kept_bytes
    finally:
        engine.stop()


def test_a_long_context_waiting_for_room_is_not_overtaken_by_short_ones(demo: ModelSpec) -> None:
    size = sizes(demo)
    engine = engine_with(size.weights_bytes + size.kv.per_token * 450)
    seen: dict[str, list[float]] = {"a": [], "long": [], "short": []}
    lengths = {"a": 98, "long": 298, "short": 5}
    try:
        handles = []
        for job_id, max_tokens in lengths.items():
            sub = submission(demo, job_id, max_tokens=max_tokens, ignore_eos=True)
            sub.on_text = lambda _piece, job_id=job_id: seen[job_id].append(time.monotonic())
            handles.append(engine.submit(sub))
            time.sleep(0.05)
        for handle in handles:
            assert handle.wait(60) and handle.result()
        # "short" would fit beside "a"; it waits its turn behind "long", which fits only alone.
        assert min(seen["long"]) > max(seen["a"])
        assert min(seen["short"]) > min(seen["long"])
    finally:
        engine.stop()


def test_a_job_waiting_for_room_ends_at_its_deadline(demo: ModelSpec) -> None:
    size = sizes(demo)
    engine = engine_with(size.weights_bytes + size.kv.per_token * 2000)
    try:
        running = engine.submit(submission(demo, "running", max_tokens=1900, ignore_eos=True))
        late = submission(demo, "late", max_tokens=200, ignore_eos=True)
        late.deadline = time.monotonic() + 0.3
        waiting = engine.submit(late)
        assert waiting.wait(5)
        with pytest.raises(JobTimedOut):
            waiting.result()
        assert running.wait(60) and running.result().completion_tokens == 1900
    finally:
        engine.stop()
