"""A stream is exactly its job's result through faults: a worker SIGKILLed under open streams (the
requeued jobs carry on from the tokens their streams hold) and a Redis restarted under them (the
worker keeps what it could not write). Sampled text (temperature 1, no seed), so that an attempt
that started again would write other words. OpenAI's, Anthropic's and Ollama's streaming routes
through the real gateway, watchdog, worker and Redis."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import Service
from tests.support.redis_servers import PersistentRedis
from tests.test_watchdog import FAST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HI = [{"role": "user", "content": "Tell me a long story"}]
TOKENS = 2000


@dataclass
class Streamed:
    """What one client read of its stream."""

    route: str
    job_id: str = ""
    text: str = ""
    ended: str = ""
    """How the stream ended: a finish reason, or "error: ..."."""
    started: threading.Event = field(default_factory=threading.Event)


def openai_stream(client: httpx.Client, out: Streamed) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": TOKENS, "temperature": 1.0, "stream": True}
    body["ignore_eos"] = True
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        out.job_id = response.headers["x-mlxq-job-id"]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.ended = f"error: {chunk['error']}"
                continue
            choice = chunk["choices"][0]
            out.text += choice["delta"].get("content") or ""
            out.ended = choice.get("finish_reason") or out.ended
            if len(out.text) > 20:
                out.started.set()


def anthropic_stream(client: httpx.Client, out: Streamed) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": TOKENS, "temperature": 1.0, "stream": True}
    with client.stream("POST", "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}) as response:
        assert response.status_code == 200, response.read()
        out.job_id = response.headers["x-mlxq-job-id"]
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
                out.text += event["delta"]["text"]
            elif event["type"] == "message_delta":
                out.ended = event["delta"]["stop_reason"]
            elif event["type"] == "error":
                out.ended = f"error: {event['error']}"
            if len(out.text) > 20:
                out.started.set()


def ollama_stream(client: httpx.Client, out: Streamed) -> None:
    body = {"model": "tiny", "messages": HI, "options": {"num_predict": TOKENS, "temperature": 1.0}}
    with client.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200, response.read()
        out.job_id = response.headers["x-mlxq-job-id"]
        for line in response.iter_lines():
            if not line:
                continue
            document = json.loads(line)
            if "error" in document:
                out.ended = f"error: {document['error']}"
                continue
            out.text += document["message"]["content"]
            if document["done"]:
                out.ended = document["done_reason"]
            if len(out.text) > 20:
                out.started.set()


ROUTES: list[tuple[str, Callable[[httpx.Client, Streamed], None]]] = [
    ("openai", openai_stream),
    ("anthropic", anthropic_stream),
    ("ollama", ollama_stream),
] * 3


def streams_through(svc: Service, fault: Callable[[], None]) -> list[Streamed]:
    """Open a stream on each route, wait until each has shown some text, bring on the fault, and read
    every stream to its end."""
    outs = [Streamed(route) for route, _ in ROUTES]
    client = httpx.Client(base_url=svc.base_url, timeout=180, limits=httpx.Limits(max_connections=20))

    def reading(read: Callable[[httpx.Client, Streamed], None], out: Streamed) -> None:
        try:
            read(client, out)
        finally:
            out.started.set()  # one that ended at end-of-text before the fault holds nothing up

    threads = [threading.Thread(target=reading, args=(read, out)) for (_, read), out in zip(ROUTES, outs, strict=True)]
    for thread in threads:
        thread.start()
    for out in outs:
        assert out.started.wait(60), out
    fault()
    for thread in threads:
        thread.join(240)
        assert not thread.is_alive()
    return outs


def assert_exact(svc: Service, outs: list[Streamed]) -> list[dict[str, Any]]:
    views = []
    for out in outs:
        view = svc.wait_for(out.job_id, {"finished", "failed"}, timeout_s=60)
        assert view["status"] == "finished", view
        assert not out.ended.startswith("error"), out
        assert out.text == view["result"]["text"], (out.route, out.job_id)
        views.append(view)
    return views


def test_streams_through_a_worker_sigkill_repeat_nothing_and_miss_nothing(
    persistent_redis: PersistentRedis, data_dir: Path, tmp_path: Path
) -> None:
    svc = Service(persistent_redis.url, data_dir, tmp_path, supervised=True, **FAST)
    try:
        outs = streams_through(svc, lambda: os.kill(svc.worker_pid(), signal.SIGKILL))
        views = assert_exact(svc, outs)
        # Those past end-of-text (OpenAI's, with ignore_eos) were running when the worker died, and
        # carried on from where their streams were (an attempt that started again would differ).
        openai_ones = [view for out, view in zip(outs, views, strict=True) if out.route == "openai"]
        assert [view["attempts"] for view in openai_ones] == [1] * 3
        assert [view["result"]["usage"]["completion_tokens"] for view in openai_ones] == [TOKENS] * 3
        # Requeued from a dead worker, they ran batched again (each alone only until it generated
        # past where it was): every one started again before the first of them ended.
        assert max(v["started_at"] for v in openai_ones) < min(v["ended_at"] for v in openai_ones)
    finally:
        svc.stop()


def test_streams_through_a_redis_restart_lose_nothing(
    persistent_redis: PersistentRedis, data_dir: Path, tmp_path: Path
) -> None:
    svc = Service(persistent_redis.url, data_dir, tmp_path, supervised=True, **FAST)
    try:

        def restart() -> None:
            persistent_redis.kill()
            time.sleep(3)
            persistent_redis.start()

        assert_exact(svc, streams_through(svc, restart))
    finally:
        svc.stop()
