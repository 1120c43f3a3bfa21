"""Hundreds of open streams on one gateway: one reader serves them all, with a fixed number of Redis
connections (gateway/streams/hub.py). Real gateway, worker and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import psutil
import pytest
from redis import Redis

from tests.support.processes import Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

STREAMS = 200
"""Twice what redis-py's default pool held, when each stream held a connection."""

CONNECTIONS = 8
"""The gateway's pool size (each of its two): far fewer than the streams, and than its threads."""


@pytest.fixture(scope="module")
def roomy(redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/11",
        data_dir,
        tmp_path_factory.mktemp("streams-logs"),
        heartbeat_interval_s=0.5,
        rate_limit_requests=100_000,
        max_inflight_per_client=10_000,
        max_queued=10_000,
        max_batch=16,
        redis_connections=CONNECTIONS,
    )
    yield svc
    svc.stop()


def redis_connections_of(pid: int, redis_port: int) -> int:
    """The process's open TCP connections to Redis (the worker's, which grow with its batch, apart)."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
    )


def test_hundreds_of_waiting_streams_use_a_fixed_number_of_connections_and_all_complete(roomy: Service) -> None:
    redis = Redis.from_url(roomy.env["MLXQ_REDIS_URL"])
    blocker = [roomy.submit(model="tiny", prompt="Hold", max_tokens=30_000, ignore_eos=True, priority="normal")["id"]]
    roomy.wait_for(blocker[0], {"started"})
    redis_port = int(redis.connection_pool.connection_kwargs["port"])
    gateway_connections = partial(redis_connections_of, roomy.gateway.pid, redis_port)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}

    async def one(client: httpx.AsyncClient, opened: list[int]) -> str:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            opened.append(1)
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        return lines[-1]

    async def many() -> tuple[list[str], int]:
        limits = httpx.Limits(max_connections=STREAMS + 10)
        async with httpx.AsyncClient(base_url=roomy.base_url, timeout=120, limits=limits) as client:
            opened: list[int] = []
            tasks = [asyncio.create_task(one(client, opened)) for _ in range(STREAMS)]
            deadline = time.monotonic() + 60
            while len(opened) < STREAMS and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # every stream open and waiting behind the blocker
            during = gateway_connections()
            roomy.http.delete(f"/v1/jobs/{blocker[0]}")
            return list(await asyncio.gather(*tasks)), during

    try:
        ends, during = asyncio.run(many())
    finally:
        redis.close()
    assert ends == ["data: [DONE]"] * STREAMS
    # The gateway's two pools at most, whether 1 or 200 streams are open; 200 requests at once from
    # threads opened one connection each when the threads' pool was unbounded.
    assert during <= 2 * CONNECTIONS, during
