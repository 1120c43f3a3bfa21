"""A Redis that answers but refuses writes is weather, as one that is away: out of memory under
`maxmemory`, short of `min-replicas-to-write`, a replica (`replicaof`), and a full disk (its AOF
over a file-size limit: MISCONF). Through the real gateway, watchdog, worker and redis-server: each
refusal is a 503 with Retry-After that names it, /health says which it is, no process dies, and the
job running through all of them ends once; every condition is a `redis_degraded` event after."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.support.processes import Service
from tests.support.redis_servers import free_port, redis_server_binary, wait_for_redis
from tests.test_watchdog import FAST, results_of, started_registry_is_empty

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


class LimitedRedis:
    """A redis-server with an AOF whose files may not grow past 64 MB, as on a disk that fills."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = (
            f"trap '' XFSZ; ulimit -f 65536; exec {redis_server_binary()} --port {self.port} --bind 127.0.0.1 "
            f"--dir {directory} --save '' --appendonly yes --appendfsync everysec --logfile {directory}/redis.log"
        )
        self.process = subprocess.Popen(["bash", "-c", command])
        wait_for_redis(self.url, self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[LimitedRedis]:
    (tmp_path / "redis").mkdir()
    server = LimitedRedis(tmp_path / "redis")
    yield server
    server.stop()


def fill_the_disk(redis: Redis) -> None:
    for n in range(1000):
        try:
            redis.set(f"filler:{n}", b"x" * 1_000_000)
        except RedisError:
            return
        time.sleep(0.005)  # the AOF is written between commands
    raise AssertionError("the AOF never hit its file-size limit")


def wait_writable(svc: Service, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if svc.http.get("/health").json().get("redis", {}).get("writable"):
            return
        time.sleep(0.2)
    raise AssertionError("Redis never writable again through /health")


def test_each_redis_refusal_is_a_503_naming_it_and_every_job_ends_once(
    limited: LimitedRedis, data_dir: Path, tmp_path: Path
) -> None:
    direct = Redis.from_url(limited.url)
    svc = Service(limited.url, data_dir, tmp_path, supervised=True, **FAST)
    try:
        worker_pid = svc.worker_pid()
        long = svc.submit(model="tiny", prompt="Long", max_tokens=12_000, ignore_eos=True)["id"]
        svc.wait_for(long, {"started"})
        # A streaming client that will hang up while Redis refuses writes: its cancel must not be lost.
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Go"}], "stream": True}
        body.update(max_tokens=30_000, ignore_eos=True)
        streamer = httpx.Client(base_url=svc.base_url, timeout=60)
        stream = streamer.stream("POST", "/v1/chat/completions", json=body)
        hung_up = stream.__enter__().headers["x-mlxq-job-id"]
        svc.wait_for(hung_up, {"started"})
        conditions: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            ("out of memory", lambda: direct.config_set("maxmemory", 1), lambda: direct.config_set("maxmemory", 0)),
            (
                "too few replicas",
                lambda: direct.config_set("min-replicas-to-write", 1),
                lambda: direct.config_set("min-replicas-to-write", 0),
            ),
            ("read-only", lambda: direct.replicaof("127.0.0.1", free_port()), lambda: direct.replicaof("NO", "ONE")),
            ("cannot persist", lambda: fill_the_disk(direct), lambda: direct.config_set("appendonly", "no")),
        ]
        short = []
        for words, begin, end in conditions:
            begin()
            refused = svc.http.post("/v1/jobs", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4})
            assert refused.status_code == 503, (words, refused.text)
            assert refused.headers["Retry-After"] and words in refused.json()["error"]["message"], refused.text
            health = svc.http.get("/health")
            assert health.status_code == 503 and words in health.json()["redis"]["condition"], health.text
            if words == "out of memory":
                stream.__exit__(None, None, None)  # the client goes; Redis cannot take the cancel now
                streamer.close()
            time.sleep(1.5)  # the worker generates on meanwhile; what it cannot write waits
            end()
            wait_writable(svc)
            short.append(svc.submit(model="tiny", prompt="Hi", max_tokens=4)["id"])
        for job_id in [long, *short]:
            assert svc.wait_for(job_id, {"finished", "failed"}, timeout_s=120)["status"] == "finished", job_id
            assert len(results_of(direct, job_id)) == 1, job_id
        # The cancel was kept by the gateway and written once Redis took writes again.
        assert svc.wait_for(hung_up, {"canceled", "finished", "failed"}, timeout_s=60)["status"] == "canceled"
        assert started_registry_is_empty(direct)
        assert svc.worker.alive() and svc.gateway.alive() and svc.worker_pid() == worker_pid
        assert svc.events("worker_died") == []
        recorded = {event["condition"] for event in svc.events("redis_degraded")}
        assert all(any(words in condition for condition in recorded) for words, _, _ in conditions), recorded
    finally:
        svc.stop()
