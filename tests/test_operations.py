"""Operations: Prometheus metrics, rq-dashboard against our jobs, log formats."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.logs import JsonFormatter, TextFormatter
from tests.support.processes import Process, Service, service_env
from tests.support.redis_servers import RedisServer, free_port
from worker.demo_model import build_tiny_model

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello"}]


def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = service.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, data_dir: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("ops")
    models_file = root / "models.toml"
    models_file.write_text(f'[models.later]\npath = "{root / "later"}"\n')
    (root / "later").mkdir()
    (root / "later" / "config.json").write_text('{"model_type": "qwen2"}')  # its weights are not there yet
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/5",
        data_dir,
        root,
        models_file=models_file,
        rate_limit_requests=5,
        rate_limit_window_s=5,
        heartbeat_interval_s=0.3,
        trusted_proxies="127.0.0.1/32",  # a test speaks for another client with X-Forwarded-For
    )
    svc.root = root  # type: ignore[attr-defined]
    yield svc
    svc.stop()


def test_metrics_parse_and_move_by_the_right_amounts(ops: Service) -> None:
    before = scrape(ops)
    finished = [ops.submit(model="tiny", messages=HELLO, max_tokens=5, ignore_eos=True)["id"] for _ in range(3)]
    for job_id in finished:
        ops.wait_for(job_id, {"finished"})
    failed = ops.submit(model="later", messages=HELLO)["id"]  # its weights are not there yet
    ops.wait_for(failed, {"failed"})
    refused = [ops.http.post("/v1/jobs", json={"model": "tiny", "messages": HELLO}) for _ in range(3)]
    assert [r.status_code for r in refused] == [202, 429, 429]  # 5 per window: 4 used, one more, then refusals
    unknown = ops.http.post("/v1/jobs", json={"model": "nope", "messages": HELLO})
    assert unknown.status_code == 404
    after = scrape(ops)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Refusals repeated from the gateway's memory reach Redis with its next flush (each second).
    deadline = time.monotonic() + 60
    while moved("mlxq_refusals_total", reason="rate_limited") < [r.status_code for r in refused].count(429):
        assert time.monotonic() < deadline, "the refusals made from memory never reached the counters"
        time.sleep(0.2)
        after = scrape(ops)

    assert moved("mlxq_jobs_total", status="finished") >= 3  # the one admitted among `refused` may finish too
    assert moved("mlxq_jobs_total", status="failed") == 1
    assert moved("mlxq_admissions_total") == 4 + [r.status_code for r in refused].count(202)
    assert moved("mlxq_refusals_total", reason="rate_limited") == [r.status_code for r in refused].count(429)
    assert moved("mlxq_refusals_total", reason="model_not_found") == 1
    assert moved("mlxq_tokens_generated_total") >= 15
    assert moved("mlxq_generation_seconds_count") >= 3
    assert moved("mlxq_time_to_first_token_seconds_count") >= 3
    assert moved("mlxq_queue_wait_seconds_count") >= 3
    assert value(after, "mlxq_tokens_per_second_bucket", le="+Inf") >= 3
    assert value(after, "mlxq_queue_depth", queue="mlxq-interactive") == 0
    assert value(after, "mlxq_workers") == 1
    worker = ops.http.get("/health").json()["workers"][0]["name"]
    assert value(after, "mlxq_model_loaded", worker=worker, model="tiny") == 1
    assert value(after, "mlxq_model_bytes", worker=worker, model="tiny") > 100_000
    assert value(after, "mlxq_prefix_cache_bytes", worker=worker, tier="memory") >= 0
    assert 0 < value(after, "mlxq_memory_used_percent", worker=worker) < 100
    assert value(after, "mlxq_circuit_state", state="closed") == 1
    assert ("mlxq_worker_restarts_total", ()) in after


def test_rq_dashboard_shows_our_queues_workers_and_jobs_and_requeues_a_failed_one(
    ops: Service, data_dir: Path, tmp_path: Path
) -> None:
    # Another client than the metrics test's, whose rate window may still be full: a window of its own.
    other = {"X-Forwarded-For": "198.51.100.7"}

    def submitted(**body: Any) -> str:
        response = ops.http.post("/v1/jobs", json=body, headers=other)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    done = ops.wait_for(submitted(model="tiny", messages=HELLO, max_tokens=3), {"finished"})
    failed = ops.wait_for(submitted(model="later", messages=HELLO), {"failed"})

    port = free_port()
    env = {**service_env(ops.env["MLXQ_REDIS_URL"], data_dir), "MLXQ_DASHBOARD_PORT": str(port)}
    env["MLXQ_DASHBOARD_PASSWORD"] = "s3cret"
    # The way a person starts it: scripts/dashboard (which finds the venv scripts/test set up).
    dashboard = Process("scripts/dashboard", env, tmp_path / "dashboard.log", ["bash", "scripts/dashboard"])
    base = f"http://127.0.0.1:{port}"
    auth = ("mlxq", "s3cret")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/0/data/queues.json", auth=auth, timeout=2)
                break
            except httpx.TransportError:
                assert dashboard.alive() and time.monotonic() < deadline, dashboard.tail()
                time.sleep(0.2)
        assert httpx.get(base + "/0/data/queues.json").status_code == 401  # basic auth when a password is set

        queues = {q["name"] for q in httpx.get(base + "/0/data/queues.json", auth=auth).json()["queues"]}
        assert {"mlxq-interactive", "mlxq-jobs", "mlxq-batch"} <= queues
        workers = httpx.get(base + "/0/data/workers.json", auth=auth).json()["workers"]
        assert [w["name"] for w in workers] == [ops.http.get("/health").json()["workers"][0]["name"]]

        def listed(registry: str) -> dict[str, Any]:
            url = f"{base}/0/data/jobs/mlxq-jobs/{registry}/100/asc/1.json"
            return {j["id"]: j for j in httpx.get(url, auth=auth).json()["jobs"]}

        finished_jobs = listed("finished")
        assert done["id"] in finished_jobs
        assert finished_jobs[done["id"]]["description"] == "generate model=tiny priority=normal"
        assert failed["id"] in listed("failed")

        shutil.rmtree(ops.root / "later")  # type: ignore[attr-defined]
        build_tiny_model(ops.root / "later")  # type: ignore[attr-defined]  # the fix: now the model exists
        # As the dashboard's own page sends it (its Origin: another site's form is refused).
        requeued = httpx.post(f"{base}/job/{failed['id']}/requeue", auth=auth, headers={"Origin": base})
        assert requeued.status_code == 200 and requeued.json()["status"] == "OK"
        again = ops.wait_for(failed["id"], {"finished", "failed"}, timeout_s=30)
        while again["status"] == "failed" and again["ended_at"] == failed["ended_at"]:
            time.sleep(0.1)
            again = ops.job(failed["id"])
        again = ops.wait_for(failed["id"], {"finished"}, timeout_s=30)
        assert again["result"]["model"] == "later"
    finally:
        dashboard.stop()


def record(name: str, **extra: Any) -> logging.LogRecord:
    item = logging.makeLogRecord({"name": name, "msg": "job finished", "levelname": "INFO", "levelno": 20})
    item.__dict__.update(extra)
    return item


def test_log_lines_carry_job_fields_in_text_and_json_but_never_job_arguments() -> None:
    ours = record("worker.tasks", job_id="j1", model="tiny", tokens=5, generate_s=0.1, args=["secret prompt"])
    text = TextFormatter().format(ours)
    assert "job finished" in text and "job_id=j1 model=tiny tokens=5 generate_s=0.1" in text
    assert "secret" not in text
    document = json.loads(JsonFormatter().format(ours))
    assert document["job_id"] == "j1" and document["tokens"] == 5 and document["level"] == "info"
    assert "args" not in document
    theirs = record("rq.worker", job_id="j1", args=["secret prompt"], kwargs={})
    assert "secret" not in TextFormatter().format(theirs)
    assert "secret" not in JsonFormatter().format(theirs)


def test_the_jobs_listing_names_each_running_jobs_owner_and_model(ops: Service) -> None:
    # A client of its own (the gateway trusts this proxy): the window's rate limit is the other tests'.
    headers = {"X-Forwarded-For": "203.0.113.7"}
    body = {"model": "tiny", "prompt": "Long", "max_tokens": 20_000, "ignore_eos": True}
    job_id = ops.http.post("/v1/jobs", json=body, headers=headers).json()["id"]
    try:
        ops.wait_for(job_id, {"started"})
        deadline = time.monotonic() + 30
        while True:  # listed once the worker's heartbeat names it
            listing = ops.http.get("/v1/admin/jobs").json()
            rows = [row for row in listing["jobs"] if row["id"] == job_id]
            if rows:
                break
            assert time.monotonic() < deadline, listing
            time.sleep(0.1)
        [row] = rows
        assert row["state"] == "running" and row["model"] == "tiny", row
        assert isinstance(row["owner"], str) and row["owner"], row  # the client's tag (its address is not shown)
        assert listing["by_owner"][row["owner"]]["running"] == 1, listing
    finally:
        ops.http.delete(f"/v1/jobs/{job_id}")
