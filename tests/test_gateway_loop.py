"""The gateway's event loop never waits on Redis's answer: while Redis holds every command (CLIENT
PAUSE, as a busy or swapping Redis does), a request that needs nothing of Redis is answered at once,
whatever the requests beside it are waiting for. A sync Redis call made on the loop would hold it,
and with it every client of the gateway, until Redis answered. Real gateway and redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from tests.support.processes import Gateway
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

PAUSE_S = 8
"""How long Redis holds every command (from every client: CLIENT UNPAUSE would wait too); the loop is
free when a request is answered well inside it."""

ANSWERED_S = 2.0
"""A request beside them is answered in milliseconds; a sync call on the loop held it for redis-py's
socket timeout (5 s), less the half second the test waits before asking."""


@pytest.fixture
def gateway(tmp_path: Path, data_dir: Path, models_file: Path) -> Iterator[tuple[Gateway, Redis]]:
    server = RedisServer(tmp_path)
    gateway = Gateway(server.url, data_dir, tmp_path / "gateway.log", models_file=models_file)
    try:
        yield gateway, Redis.from_url(server.url)
    finally:
        gateway.stop()
        server.stop()


def pause(gateway: Gateway, redis: Redis) -> None:
    assert httpx.get(gateway.base_url + "/openapi.json").status_code == 200  # built once, before
    redis.execute_command("CLIENT", "PAUSE", PAUSE_S * 1000, "ALL")


def answered_while_paused(base_url: str) -> float:
    """Seconds /openapi.json (no Redis in it) took while Redis was paused."""
    started = time.monotonic()
    response = httpx.get(base_url + "/openapi.json", timeout=PAUSE_S * 3)
    assert response.status_code == 200
    return time.monotonic() - started


def test_a_job_events_snapshot_waits_for_redis_off_the_loop(gateway: tuple[Gateway, Redis]) -> None:
    server, redis = gateway
    pause(server, redis)
    # Its snapshot of the job needs Redis: it waits out the pause.
    waiting = threading.Thread(
        target=lambda: httpx.get(server.base_url + "/v1/jobs/some-job/events", timeout=PAUSE_S * 3)
    )
    waiting.start()
    time.sleep(0.5)
    took = answered_while_paused(server.base_url)
    waiting.join(PAUSE_S * 3)
    assert took < ANSWERED_S, took


def test_a_stream_whose_client_hangs_up_cancels_its_job_off_the_loop(gateway: tuple[Gateway, Redis]) -> None:
    """No worker here: the job stays queued, its stream quiet, until the client hangs up; the cancel
    then waits for Redis on a thread, and lands once Redis is back."""
    server, redis = gateway
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            job_id = response.headers["x-mlxq-job-id"]
            pause(server, redis)
    time.sleep(0.5)  # the gateway sees the hang-up and cancels the job
    took = answered_while_paused(server.base_url)
    assert took < ANSWERED_S, took
    deadline = time.monotonic() + 30
    while True:  # 503 while Redis holds the job's record
        answer = httpx.get(f"{server.base_url}/v1/jobs/{job_id}", timeout=PAUSE_S * 3)
        if answer.status_code == 200 and answer.json()["status"] == "canceled":
            break
        assert time.monotonic() < deadline, "the cancel did not land once Redis was back"
        time.sleep(0.2)
