"""Admission through real gateway processes: two of them against one Redis, no worker."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from shared import circuit
from shared.circuit import CircuitRecord, CircuitState
from tests.support.processes import Gateway

pytestmark = pytest.mark.slow

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
KEYS = [f"key-{i}" for i in range(12)]


@pytest.fixture
def gateways(
    request: pytest.FixtureRequest, scratch_redis_url: str, data_dir: Path, tmp_path: Path
) -> Iterator[list[Gateway]]:
    overrides: dict[str, Any] = request.param
    started = [Gateway(scratch_redis_url, data_dir, tmp_path / f"gateway-{i}.log", **overrides) for i in range(2)]
    yield started
    for gateway in started:
        gateway.stop()


def hammer(gateways: list[Gateway], per_client: int) -> list[tuple[str, httpx.Response]]:
    """Every client sends `per_client` submissions at once, alternating between the gateways."""
    results: list[tuple[str, httpx.Response]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(KEYS))

    def client(key: str) -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            start.wait()
            for i in range(per_client):
                response = http.post(gateways[i % 2].base_url + "/v1/jobs", json=BODY)
                with lock:
                    results.append((key, response))

    threads = [threading.Thread(target=client, args=(key,)) for key in KEYS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def assert_refusal(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert int(response.headers["Retry-After"]) >= 1


LIMITS = {"api_keys": ",".join(KEYS), "rate_limit_requests": 5, "max_inflight_per_client": 1000, "max_queued": 40}


@pytest.mark.parametrize("gateways", [LIMITS], indirect=True)
def test_two_gateways_never_admit_past_the_queue_or_rate_limits(
    gateways: list[Gateway], scratch_redis_url: str
) -> None:
    results = hammer(gateways, per_client=10)
    admitted = Counter(key for key, r in results if r.status_code == 202)
    assert sum(admitted.values()) <= 40
    assert max(admitted.values()) <= 5
    for _, response in results:
        if response.status_code == 202:
            assert response.headers["x-ratelimit-limit-requests"] == "5"
            assert int(response.headers["x-ratelimit-remaining-requests"]) < 5
        elif response.status_code == 429:
            assert_refusal(response, 429, "rate_limited")
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
        else:
            assert_refusal(response, 503, "queue_full")
    # 12 clients x 10 = 120 requests: 60 could pass the rate limit, but only 40 fit in the queue.
    assert sum(admitted.values()) == 40
    # Only a client that used its whole window is told it is rate limited; refusals take no slot.
    for key in KEYS:
        if any(r.status_code == 429 for k, r in results if k == key):
            assert admitted[key] == 5
    codes = Counter(r.json()["error"]["code"] for _, r in results if r.status_code != 202)
    redis = Redis.from_url(scratch_redis_url)
    assert redis.llen("rq:queue:mlxq-jobs") == 40
    assert sum(codes.values()) == 80
    # Refusals repeated from a gateway's memory reach the shared counters within a second.
    expected = {"admitted": 40, "refused": dict(codes)}
    deadline = time.monotonic() + 5
    while httpx.get(gateways[0].base_url + "/health").json()["admission"] != expected:
        assert time.monotonic() < deadline, httpx.get(gateways[0].base_url + "/health").json()["admission"]
        time.sleep(0.2)


INFLIGHT = {"api_keys": ",".join(KEYS), "rate_limit_requests": 1000, "max_inflight_per_client": 3, "max_queued": 1000}


@pytest.mark.parametrize("gateways", [INFLIGHT], indirect=True)
def test_two_gateways_never_admit_past_a_clients_in_flight_cap(gateways: list[Gateway]) -> None:
    results = hammer(gateways, per_client=8)
    admitted = Counter(key for key, r in results if r.status_code == 202)
    assert all(count == 3 for count in admitted.values()), admitted
    for _, response in results:
        if response.status_code != 202:
            assert_refusal(response, 429, "too_many_inflight")


UNTRUSTED = {"rate_limit_requests": 2}


@pytest.mark.parametrize("gateways", [UNTRUSTED], indirect=True)
def test_forwarded_for_from_an_untrusted_peer_does_not_change_the_client(gateways: list[Gateway]) -> None:
    url = gateways[0].base_url + "/v1/jobs"
    statuses = [
        httpx.post(url, json=BODY, headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(3)
    ]
    assert statuses == [202, 202, 429]


TRUSTED = {"rate_limit_requests": 2, "trusted_proxies": "127.0.0.1"}


@pytest.mark.parametrize("gateways", [TRUSTED], indirect=True)
def test_forwarded_for_from_a_trusted_proxy_names_the_client(gateways: list[Gateway]) -> None:
    url = gateways[0].base_url + "/v1/jobs"
    statuses = [
        httpx.post(url, json=BODY, headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(3)
    ]
    assert statuses == [202, 202, 202]


WINDOW = {"rate_limit_requests": 2, "rate_limit_window_s": 2}


@pytest.mark.parametrize("gateways", [WINDOW], indirect=True)
def test_a_refused_client_is_admitted_after_retry_after(gateways: list[Gateway]) -> None:
    url = gateways[0].base_url + "/v1/jobs"
    assert [httpx.post(url, json=BODY).status_code for _ in range(2)] == [202, 202]
    refused = httpx.post(url, json=BODY)
    assert_refusal(refused, 429, "rate_limited")
    wait = int(refused.headers["Retry-After"])
    assert wait <= 2
    time.sleep(wait)
    assert httpx.post(url, json=BODY).status_code == 202


OPEN = {"api_keys": "secret"}


@pytest.mark.parametrize("gateways", [OPEN], indirect=True)
def test_an_open_circuit_is_503_with_retry_after(gateways: list[Gateway], scratch_redis_url: str) -> None:
    redis = Redis.from_url(scratch_redis_url)
    now_ms = circuit.redis_now_ms(redis)
    circuit.write(redis, CircuitRecord(CircuitState.OPEN, 5, now_ms, now_ms + 30_000))
    response = httpx.post(gateways[1].base_url + "/v1/jobs", json=BODY, headers={"Authorization": "Bearer secret"})
    assert_refusal(response, 503, "circuit_open")
    assert 29 <= int(response.headers["Retry-After"]) <= 30
    assert httpx.get(gateways[1].base_url + "/health").json()["circuit"]["state"] == "open"


@pytest.mark.parametrize("gateways", [OPEN], indirect=True)
def test_api_keys_guard_every_v1_route_but_not_health(gateways: list[Gateway]) -> None:
    base = gateways[0].base_url
    for method, path in [("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"), ("DELETE", "/v1/jobs/x"), ("GET", "/v1/models")]:
        response = httpx.request(method, base + path, json=BODY)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.post(base + "/v1/jobs", json=BODY, headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401
    # Authentication comes before shape: a bad body without a key is still 401.
    assert httpx.post(base + "/v1/jobs", json={"model": 1}).status_code == 401
    assert httpx.get(base + "/health").status_code in (200, 503)
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200


SMALL_BODY = {"max_body_bytes": 1000}


@pytest.mark.parametrize("gateways", [SMALL_BODY], indirect=True)
def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(gateways: list[Gateway]) -> None:
    url = gateways[0].base_url + "/v1/jobs"
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
    declared = httpx.post(url, json=big)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "request_too_large"
    assert httpx.post(url, json=BODY).status_code == 202
    refused = httpx.get(gateways[0].base_url + "/health").json()["admission"]["refused"]
    assert refused["request_too_large"] == 2
