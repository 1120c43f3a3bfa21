"""Continuous batching through a real gateway, worker (MLXQ_MAX_BATCH=16) and Redis."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from tests.support.processes import Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow


def database(redis_server: RedisServer, index: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{index}"


@pytest.fixture(scope="module")
def batched(redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(
        database(redis_server, 9),
        data_dir,
        tmp_path_factory.mktemp("batched-logs"),
        heartbeat_interval_s=0.5,
        max_batch=16,
        max_inflight_per_client=100,
        rate_limit_requests=10_000,
    )
    yield svc
    svc.stop()


def greedy(i: int, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": f"Story number {i} begins", "max_tokens": 40, "temperature": 0, **extra}


def alone(svc: Service, body: dict[str, Any]) -> dict[str, Any]:
    """The job's view when it ran with nothing else in the batch."""
    return svc.wait_for(svc.submit(**body)["id"], {"finished"})


def together(svc: Service, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [svc.submit(**body)["id"] for body in bodies]
    return [svc.wait_for(job_id, {"finished", "failed", "canceled"}) for job_id in ids]


def test_eight_jobs_run_in_one_batch_with_the_text_each_has_alone(batched: Service) -> None:
    bodies = [greedy(i, ignore_eos=True) for i in range(8)]
    solo = [alone(batched, body)["result"]["text"] for body in bodies]
    views = together(batched, bodies)
    assert [v["result"]["text"] for v in views] == solo
    assert max(v["started_at"] for v in views) < min(v["ended_at"] for v in views), "they did not overlap"
    assert sum(v["result"]["timings"]["load_s"] > 0 for v in views) == 0  # the model stayed loaded: one load


def test_a_job_canceled_mid_batch_ends_within_a_second_and_the_others_keep_their_text(batched: Service) -> None:
    bodies = [greedy(i, max_tokens=400, ignore_eos=True) for i in range(4)]
    solo = [alone(batched, body)["result"]["text"] for body in bodies[:3]]
    ids = [batched.submit(**body)["id"] for body in bodies]
    for job_id in ids:
        batched.wait_for(job_id, {"started"})
    asked = time.monotonic()
    batched.http.delete(f"/v1/jobs/{ids[3]}")
    batched.wait_for(ids[3], {"canceled"}, timeout_s=1.0)
    assert time.monotonic() - asked < 1.0
    texts = [batched.wait_for(job_id, {"finished"})["result"]["text"] for job_id in ids[:3]]
    assert texts == solo


def test_each_job_in_a_batch_keeps_its_own_sampling_stops_and_length(batched: Service) -> None:
    plain = greedy(1, ignore_eos=True)
    reference = alone(batched, plain)["result"]["text"]
    stop_at = reference[10:14]
    seeded = {
        "model": "tiny",
        "prompt": "Seeded",
        "max_tokens": 30,
        "temperature": 1.0,
        "seed": 1234,
        "ignore_eos": True,
    }
    seeded_alone = alone(batched, seeded)["result"]["text"]
    bodies = [
        plain,
        greedy(1, ignore_eos=True, stop=[stop_at]),
        greedy(2, ignore_eos=True, max_tokens=7),
        seeded,
        {**seeded, "seed": 99},
        {"model": "tiny", "prompt": "Hot", "max_tokens": 30, "temperature": 1.5, "ignore_eos": True},
    ]
    views = together(batched, bodies)
    results = [v["result"] for v in views]
    assert results[0]["text"] == reference
    assert results[1]["text"] == reference[: reference.index(stop_at)] and results[1]["finish_reason"] == "stop"
    assert results[2]["usage"]["completion_tokens"] == 7 and results[2]["finish_reason"] == "length"
    assert results[3]["text"] == seeded_alone  # its own random key: the same text alone and in a batch
    assert results[4]["text"] != seeded_alone
    assert results[5]["usage"]["completion_tokens"] == 30


def prompt_token_counts(svc: Service) -> dict[str, float]:
    lines = svc.http.get("/metrics").text.splitlines()
    return {
        source: float(line.rsplit(" ", 1)[1])
        for line in lines
        for source in ("computed", "cached")
        if line.startswith(f'mlxq_prompt_tokens_total{{source="{source}"}}')
    }


def test_a_fan_out_whose_children_share_a_prefix_computes_it_once(batched: Service) -> None:
    context = " ".join(f"Finding {i}: the sample from site {i} was clean." for i in range(40))
    system = {"role": "system", "content": f"You review field reports. {context}"}
    before = prompt_token_counts(batched)
    response = batched.http.post(
        "/v1/batches",
        json={
            "model": "tiny",
            "requests": [
                {"custom_id": f"q{i}", "messages": [system, {"role": "user", "content": f"Site {i}?"}], "max_tokens": 8}
                for i in range(8)
            ],
        },
    )
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (view := batched.http.get(f"/v1/batches/{batch_id}").json())["status"] not in {"completed", "canceled"}:
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    usages = [child["result"]["usage"] for child in view["requests"]]
    cached = sorted(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    # One child computes the shared prefix; the seven others start from its KV cache.
    assert cached[0] == 0
    assert all(n >= usages[0]["prompt_tokens"] - 12 for n in cached[1:]), cached
    after = prompt_token_counts(batched)
    assert after["cached"] - before["cached"] == sum(cached)
    assert after["computed"] - before["computed"] == sum(u["prompt_tokens"] for u in usages) - sum(cached)


def test_a_sigkilled_worker_holding_a_full_batch_loses_none_and_runs_none_twice(
    redis_server: RedisServer, data_dir: Path, tmp_path: Path
) -> None:
    url = database(redis_server, 10)
    svc = Service(
        url, data_dir, tmp_path, supervised=True, heartbeat_interval_s=0.5, restart_backoff_base_s=0.2, max_batch=16
    )
    try:
        ids = [svc.submit(**greedy(i, max_tokens=600, ignore_eos=True))["id"] for i in range(16)]
        deadline = time.monotonic() + 30
        while sum(svc.job(j)["status"] == "started" for j in ids) < 16:
            assert time.monotonic() < deadline, "the batch never filled"
            time.sleep(0.1)
        os.kill(svc.worker_pid(), signal.SIGKILL)
        redis = Redis.from_url(url)
        for job_id in ids:
            view = svc.wait_for(job_id, {"finished", "failed"}, timeout_s=120)
            assert view["status"] == "finished" and view["attempts"] == 1
            results = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).results()
            assert [r.type for r in results] == [Result.Type.SUCCESSFUL]
        redis.close()
    finally:
        svc.stop()
