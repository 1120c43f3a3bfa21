"""The memory budget through real processes: a worker with a small budget, a gateway, Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared import sizing
from tests.support.processes import Gateway, Service
from tests.support.redis_servers import RedisServer
from worker.demo_model import build_tiny_model

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello"}]
BUDGET = 3_000_000


@pytest.fixture(scope="module")
def small_service(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("budget")
    big = build_tiny_model(root / "big", hidden_size=256, intermediate_size=512)
    assert sizing.estimate(big).weights_bytes > BUDGET
    models_file = root / "models.toml"
    models_file.write_text(f'[models.big]\npath = "{big}"\n')
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/2",
        root / "data",
        root,
        models_file=models_file,
        model_budget_bytes=BUDGET,
        heartbeat_interval_s=0.5,
    )
    yield svc
    svc.stop()


def test_a_model_bigger_than_the_budget_fails_with_sizes_and_the_worker_lives_on(small_service: Service) -> None:
    failed = small_service.wait_for(small_service.submit(model="big", messages=HELLO)["id"], {"failed", "finished"})
    assert failed["status"] == "failed"
    error = failed["error"]
    assert error["code"] == "insufficient_memory"
    assert "model 'big' needs about" in error["message"]
    assert sizing.format_bytes(BUDGET) in error["message"]
    assert small_service.worker.alive()
    ok = small_service.wait_for(small_service.submit(model="tiny", messages=HELLO, max_tokens=4)["id"], {"finished"})
    assert ok["result"]["usage"]["completion_tokens"] <= 4


def test_models_and_health_show_sizes_budget_and_what_is_loaded(small_service: Service) -> None:
    small_service.wait_for(small_service.submit(model="tiny", messages=HELLO, max_tokens=2)["id"], {"finished"})
    models = {m["id"]: m for m in small_service.http.get("/v1/models").json()["data"]}
    demo = models["tiny"]
    assert demo["loaded"] is True
    assert demo["size_bytes"] > 100_000
    assert demo["active_requests"] == 0
    assert demo["last_used"] is not None
    assert models["big"]["loaded"] is False
    assert models["big"]["size_bytes"] > BUDGET  # estimated from its files without loading it
    worker = small_service.http.get("/health").json()["workers"][0]
    assert worker["model_budget_bytes"] == BUDGET
    assert [m["name"] for m in worker["models"]] == ["tiny"]


def test_the_admin_endpoint_unloads_a_model_now(small_service: Service) -> None:
    small_service.wait_for(small_service.submit(model="tiny", messages=HELLO, max_tokens=2)["id"], {"finished"})
    response = small_service.http.post("/v1/admin/models/tiny/unload")
    assert response.status_code == 202
    assert len(response.json()["workers"]) == 1
    deadline = time.monotonic() + 5
    while any(m["id"] == "tiny" and m["loaded"] for m in small_service.http.get("/v1/models").json()["data"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    again = small_service.wait_for(small_service.submit(model="tiny", messages=HELLO, max_tokens=2)["id"], {"finished"})
    assert again["result"]["timings"]["load_s"] > 0
    assert "asked to by an operator" in small_service.worker.log.read_text()


def test_unloading_an_unknown_model_is_404(small_service: Service) -> None:
    response = small_service.http.post("/v1/admin/models/nope/unload")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_health_is_503_degraded_when_no_worker_is_alive(redis_server: RedisServer, tmp_path: Path) -> None:
    gateway = Gateway(redis_server.url.rsplit("/", 1)[0] + "/3", tmp_path / "data", tmp_path / "gateway.log")
    try:
        response = httpx.get(gateway.base_url + "/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "degraded"
        assert body["workers"] == []
        assert set(body["memory"]) >= {"used_percent", "available_gb", "total_gb"}
    finally:
        gateway.stop()


def test_without_redis_the_gateway_starts_and_refuses_with_503_and_retry_after(tmp_path: Path) -> None:
    from tests.support.redis_servers import free_port

    gateway = Gateway(f"redis://127.0.0.1:{free_port()}/0", tmp_path / "data", tmp_path / "gateway.log")
    try:
        refused = httpx.post(gateway.base_url + "/v1/jobs", json={"model": "tiny", "prompt": "hi"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert int(refused.headers["Retry-After"]) > 0
        health = httpx.get(gateway.base_url + "/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded" and "used_percent" in health.json()["memory"]
    finally:
        gateway.stop()
