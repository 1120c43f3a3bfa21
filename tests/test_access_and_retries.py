"""Who may see what, and answers that keep clients from multiplying work: real gateway and worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis import Redis

from shared import keys
from tests.support.processes import Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def keyed(
    redis_server: RedisServer, data_dir: Path, models_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/7",
        data_dir,
        tmp_path_factory.mktemp("keyed-logs"),
        models_file=models_file,
        api_keys="key-a,key-b",
        admin_keys="key-admin",
        heartbeat_interval_s=0.5,
    )
    yield svc
    svc.stop()


def http(svc: Service, key: str) -> httpx.Client:
    return httpx.Client(base_url=svc.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def admitted(svc: Service) -> int:
    redis = Redis.from_url(svc.env["MLXQ_REDIS_URL"])
    try:
        return int(redis.get(keys.ADMITTED) or 0)
    finally:
        redis.close()


def test_a_key_sees_and_cancels_only_its_own_jobs_and_batches(keyed: Service) -> None:
    with http(keyed, "key-a") as a, http(keyed, "key-b") as b, http(keyed, "key-admin") as admin:
        job = a.post("/v1/jobs", json={"model": "tiny", "prompt": "Mine", "max_tokens": 2}).json()["id"]
        batch = a.post("/v1/batches", json={"model": "tiny", "requests": [{"messages": HELLO, "max_tokens": 2}]})
        batch_id = batch.json()["id"]
        for method, path in [
            ("GET", f"/v1/jobs/{job}"),
            ("DELETE", f"/v1/jobs/{job}"),
            ("GET", f"/v1/jobs/{job}/events"),
            ("GET", f"/v1/batches/{batch_id}"),
            ("DELETE", f"/v1/batches/{batch_id}"),
            ("GET", f"/v1/batches/{batch_id}/events"),
        ]:
            refused = b.request(method, path)
            assert refused.status_code == 404, (method, path, refused.text)
            assert refused.json()["error"]["code"] == "job_not_found"
        assert a.get(f"/v1/jobs/{job}").status_code == 200
        assert a.get(f"/v1/batches/{batch_id}").status_code == 200
        assert admin.get(f"/v1/jobs/{job}").status_code == 200  # an operator sees everything


def test_admin_routes_need_an_admin_key(keyed: Service) -> None:
    with http(keyed, "key-a") as a, http(keyed, "key-b") as b, http(keyed, "key-admin") as admin:
        for ordinary in (a, b):
            refused = ordinary.post("/v1/admin/models/tiny/unload")
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "admin_key_required"
        assert admin.post("/v1/admin/models/tiny/unload").status_code == 202


def test_only_admin_keys_see_running_job_ids_and_events(keyed: Service) -> None:
    with http(keyed, "key-a") as a, http(keyed, "key-admin") as admin:
        job = a.post("/v1/jobs", json={"model": "tiny", "prompt": "Hold", "max_tokens": 30_000, "ignore_eos": True})
        job_id = job.json()["id"]
        try:
            deadline = time.monotonic() + 30
            while a.get(f"/v1/jobs/{job_id}").json()["status"] != "started":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            while not any(job_id in w.get("jobs", []) for w in admin.get("/health").json()["workers"]):
                assert time.monotonic() < deadline, "the worker's heartbeat never listed the job"
                time.sleep(0.1)
            for client in (a, keyed.http):  # an ordinary key, and no key at all (/health is open)
                workers = client.get("/health").json()["workers"]
                assert workers and all("jobs" not in w for w in workers), workers
                assert job_id not in client.get("/health").text
            assert any(job_id in w["jobs"] for w in admin.get("/health").json()["workers"])
            assert a.get("/v1/events").status_code == 403
            assert admin.get("/v1/events").status_code == 200
        finally:
            a.delete(f"/v1/jobs/{job_id}")


def test_the_openai_sdk_with_its_default_retries_makes_one_job_per_call(keyed: Service) -> None:
    client = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="key-a")  # default: 2 retries
    before = admitted(keyed)  # a call past its wait limit (504): tests/test_waiting.py
    with pytest.raises(openai.APIStatusError) as unloadable:
        client.chat.completions.create(model="broken", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert unloadable.value.status_code == 503
    assert unloadable.value.response.headers["x-should-retry"] == "false"
    assert admitted(keyed) == before + 1


def test_a_non_streaming_client_that_hangs_up_cancels_its_job(keyed: Service) -> None:
    body: dict[str, Any] = {"model": "tiny", "messages": HELLO, "max_tokens": 4000, "ignore_eos": True}
    redis = Redis.from_url(keyed.env["MLXQ_REDIS_URL"])
    seen = set(redis.keys("rq:job:*"))
    with http(keyed, "key-a") as a, pytest.raises(httpx.ReadTimeout):
        a.post("/v1/chat/completions", json=body, timeout=0.3)  # long before its job could end
    [new] = [key for key in redis.keys("rq:job:*") if key not in seen]
    deadline = time.monotonic() + 20
    while (status := redis.hget(new, "status")) not in (b"stopped", b"canceled"):
        assert time.monotonic() < deadline, f"the job of a client that hung up is still {status!r}"
        time.sleep(0.2)
    redis.close()
