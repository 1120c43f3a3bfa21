"""Prefix affinity across hosts: two services (a gateway and a worker each, data directories of their own,
as on two machines) on one Redis. A session's turns reach the worker that holds its start, whichever
gateway they come through: each later turn reads at least 90 % of its prompt from the cache of the last
(OpenAI's Python SDK, unmodified)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from redis import Redis

from shared import keys
from tests.support.processes import Service
from tests.support.redis_servers import RedisServer
from worker.tiny_families import build_family_model

SYSTEM = (
    "You are the coding agent of a team that runs large local models. Read the files before you edit them, "
    "run the tests after every change, name each file you touch and never invent a tool's output. "
) * 24
"""About 2,500 tokens of the demo tokenizer: ten blocks."""


@pytest.fixture
def two_hosts(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[list[Service], Redis]]:
    models = tmp_path / "models.toml"
    models.write_text(f'[models.llama]\npath = "{build_family_model(tmp_path / "llama", "llama")}"\n')
    url = redis_server.url.rsplit("/", 1)[0] + "/14"
    hosts: list[Service] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            hosts.append(
                Service(url, tmp_path / name / "data", tmp_path / name, models_file=models, heartbeat_interval_s=0.5)
            )
        yield hosts, Redis.from_url(url)
    finally:
        for host in hosts:
            host.stop()


def test_a_sessions_turns_reach_the_worker_that_holds_its_start_through_either_gateway(
    two_hosts: tuple[list[Service], Redis],
) -> None:
    hosts, redis = two_hosts
    clients = [OpenAI(base_url=h.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) for h in hosts]
    deadline = time.monotonic() + 120
    while len(hosts[0].http.get("/health").json()["workers"]) < 2:  # both hosts' workers, on the one Redis
        assert time.monotonic() < deadline, "the second host's worker did not come up"
        time.sleep(0.1)
    for n, session in enumerate(("first", "second")):
        messages: list[dict[str, Any]] = [{"role": "system", "content": f"{SYSTEM} Session {session}."}]
        previous = 0
        for turn in range(5):
            messages.append({"role": "user", "content": f"Turn {turn}: which file holds the settings?"})
            answer = clients[(turn + n) % 2].chat.completions.create(
                model="llama",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
            )
            usage = answer.usage
            assert usage is not None
            cached = (usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0) or 0
            if turn > 0:
                assert cached >= 0.9 * previous, (session, turn, cached, previous)
            previous = usage.prompt_tokens
            messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    assert previous > 2000
    # Each worker published what it holds; the sessions' turns were served where their starts were.
    workers = [w for w in hosts[0].http.get("/v1/admin/status").json()["workers"]]
    assert len(workers) == 2
    assert all(redis.scard(keys.worker_prefixes(w["name"])) > 0 for w in workers if w["prefix_hits"]["memory"])
    assert sum(w["prefix_hits"]["memory"] for w in workers) >= 8
