"""Model-affinity scheduling through a real gateway, worker and Redis, with two demo models."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.support.processes import Service
from tests.support.redis_servers import RedisServer
from worker.demo_model import build_tiny_model

pytestmark = pytest.mark.slow

SWAP_AFTER_S = 2.0


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("affinity")
    models_file = root / "models.toml"
    models_file.write_text(
        "".join(f'[models.{name}]\npath = "{build_tiny_model(root / name)}"\n' for name in ("x", "y"))
    )
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/11",
        root / "data",
        root,
        models_file=models_file,
        max_batch=4,
        swap_after_s=SWAP_AFTER_S,
        heartbeat_interval_s=0.5,
        max_inflight_per_client=100,
        rate_limit_requests=10_000,
    )
    yield svc
    svc.stop()


def job(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": f"Tell {model}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def seconds(view: dict[str, Any], start: str, end: str) -> float:
    return (datetime.fromisoformat(view[end]) - datetime.fromisoformat(view[start])).total_seconds()


def swaps_since(svc: Service, count_before: int) -> int:
    return len(svc.events("model_swap")) - count_before


def test_alternating_models_are_grouped_instead_of_swapped_per_job(two_models: Service) -> None:
    before = len(two_models.events("model_swap"))
    ids = [two_models.submit(**job("xy"[i % 2], 60))["id"] for i in range(8)]
    views = [two_models.wait_for(job_id, {"finished"}, timeout_s=120) for job_id in ids]
    assert all(v["status"] == "finished" for v in views)
    # First-come-first-served would swap at every job (7 swaps); by model, once or twice.
    assert swaps_since(two_models, before) <= 2


def test_under_steady_load_a_job_for_the_other_model_waits_at_most_swap_after_plus_one_swap(
    two_models: Service,
) -> None:
    warm = two_models.wait_for(two_models.submit(**job("x", 4))["id"], {"finished"})
    assert warm["status"] == "finished"
    before = len(two_models.events("model_swap"))
    xs = [two_models.submit(**job("x", 3000))["id"] for _ in range(6)]
    two_models.wait_for(xs[0], {"started"})
    y = two_models.submit(**job("y", 20))["id"]
    # More x keeps coming while y waits: x would be served forever if affinity had no bound.
    # Only a guard against waiting for ever: the bound itself is asserted below, from the jobs' own
    # times (a loaded CI machine made a 60 s guard fire while the bound held).
    deadline = time.monotonic() + 180
    while two_models.job(y)["status"] == "queued":
        assert time.monotonic() < deadline, "the job for the other model never ran"
        if sum(two_models.job(j)["status"] == "queued" for j in xs) < 2:
            xs.append(two_models.submit(**job("x", 3000))["id"])
        time.sleep(0.2)
    y_view = two_models.wait_for(y, {"finished"}, timeout_s=120)
    x_views = [two_models.wait_for(j, {"finished"}, timeout_s=120) for j in xs]
    longest_x = max(seconds(v, "started_at", "ended_at") for v in x_views)
    waited = seconds(y_view, "created_at", "started_at")
    # It waits for swap_after (not less: x jobs were queued all along), then for the batch to drain.
    assert SWAP_AFTER_S - 0.5 <= waited <= SWAP_AFTER_S + longest_x + 3, (waited, longest_x)
    assert swaps_since(two_models, before) <= 2
