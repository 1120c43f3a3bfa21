"""Faults are weather: Redis restarts and a killed watchdog under `scripts/run`, as a user runs it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from tests.support.processes import ScriptRun
from tests.support.redis_servers import PersistentRedis

pytestmark = pytest.mark.slow

QUICK = {"heartbeat_interval_s": 0.5, "restart_backoff_base_s": 0.2}


def finished_once(redis_url: str, job_ids: list[str], timeout_s: float = 90) -> None:
    """Every job finished, with exactly one successful result (none ran twice to completion)."""
    redis = Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    pending = list(job_ids)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} jobs not finished"
        pending = [
            j for j in pending if Job.fetch(j, connection=redis, serializer=JSONSerializer).get_status() != "finished"
        ]
        time.sleep(0.2)
    for job_id in job_ids:
        results = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).results()
        assert [r.type for r in results] == [Result.Type.SUCCESSFUL], (job_id, results)
    redis.close()


def started_long_job(run: ScriptRun, max_tokens: int) -> str:
    """The id of a long job, once a worker has started it."""
    body = {"model": "tiny", "prompt": "Long", "max_tokens": max_tokens, "ignore_eos": True}
    job_id: str = run.http.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 30
    while run.http.get(f"/v1/jobs/{job_id}").json()["status"] != "started":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job_id


@pytest.mark.parametrize("outage_s", [3, 60])
def test_a_redis_restart_under_scripts_run_loses_no_job_and_runs_none_twice(outage_s: int, tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = PersistentRedis(tmp_path / "redis")
    run = ScriptRun(redis.url, tmp_path / "data", tmp_path / "run.log", **QUICK)
    try:
        run.wait_healthy()
        running = started_long_job(run, max_tokens=4000)
        queued = [
            run.http.post("/v1/jobs", json={"model": "tiny", "prompt": f"Job {i}", "max_tokens": 16}).json()["id"]
            for i in range(10)
        ]
        redis.kill()
        refused = run.http.post("/v1/jobs", json={"model": "tiny", "prompt": "During", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert run.http.get("/health").json()["status"] == "degraded"
        time.sleep(outage_s)
        redis.start()
        assert run.wait_healthy(timeout_s=15) < 15
        finished_once(redis.url, [running, *queued])
        started = Redis.from_url(redis.url).zcard("rq:wip:mlxq-jobs")
        assert started == 0
        assert "Traceback" not in (tmp_path / "data" / "logs" / "worker.log").read_text()
    finally:
        run.stop()
        redis.stop()


def test_a_sigkilled_watchdog_is_back_within_seconds_and_the_gateway_never_stops_answering(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = PersistentRedis(tmp_path / "redis")
    run = ScriptRun(redis.url, tmp_path / "data", tmp_path / "run.log", **QUICK)
    answers: list[Any] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=run.base_url, timeout=5) as http:
            while not stop.is_set():
                try:
                    answers.append(http.get("/health").status_code)
                except httpx.TransportError as exc:
                    answers.append(exc)
                time.sleep(0.1)

    try:
        run.wait_healthy()
        job_id = started_long_job(run, max_tokens=3000)
        poller = threading.Thread(target=poll)
        poller.start()
        old = run.process("worker.watchdog")
        old.kill()
        killed_at = time.monotonic()
        while True:
            try:
                new = run.process("worker.watchdog")
                if new.pid != old.pid:
                    break
            except AssertionError:
                pass
            assert time.monotonic() - killed_at < 10, "the watchdog was not started again"
            time.sleep(0.1)
        finished_once(redis.url, [job_id])
        stop.set()
        poller.join()
        assert answers and all(isinstance(a, int) for a in answers), answers
    finally:
        stop.set()
        run.stop()
        redis.stop()


def test_a_second_scripts_run_in_the_same_place_exits_and_the_first_keeps_serving(tmp_path: Path) -> None:
    first = ScriptRun(None, tmp_path / "data", tmp_path / "first.log", **QUICK)
    try:
        first.wait_healthy()
        # Prompts are in Redis's AOF: nobody but the owner reads anything scripts/run writes.
        for path in [tmp_path / "data", *(tmp_path / "data").rglob("*")]:
            if not path.is_symlink():
                assert path.stat().st_mode & 0o077 == 0, f"{path}: {oct(path.stat().st_mode)}"
        second = ScriptRun(None, tmp_path / "data", tmp_path / "second.log", **QUICK)
        assert second.popen.wait(30) != 0
        message = (tmp_path / "second.log").read_text()
        assert "already runs from" in message and str(first.popen.pid) in message
        second.stop()
        job = first.http.post("/v1/jobs", json={"model": "tiny", "prompt": "Still here", "max_tokens": 4}).json()
        deadline = time.monotonic() + 30
        while first.http.get(f"/v1/jobs/{job['id']}").json()["status"] != "finished":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Vectors from the same service, no second server: the built-in embedding model, for RAG's calls.
        vectors = first.http.post("/v1/embeddings", json={"model": "embed", "input": ["a doc", "a query"]}, timeout=120)
        assert vectors.status_code == 200 and len(vectors.json()["data"]) == 2, vectors.text
        ranked = first.http.post(
            "/v1/rerank", json={"model": "embed", "query": "a query", "documents": ["a doc", "a query"]}, timeout=60
        )
        assert ranked.status_code == 200 and ranked.json()["results"][0]["index"] == 1, ranked.text
    finally:
        first.stop()
