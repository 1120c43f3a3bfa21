"""No prompt text in any log line, library exceptions included: a marker sent through every route,
in valid and invalid requests and in a job that fails in the worker, never reaches a log."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow


def test_a_marker_sent_through_every_route_never_reaches_a_log(
    redis_server: RedisServer, data_dir: Path, models_file: Path, tmp_path: Path
) -> None:
    marker = f"SECRET-{uuid.uuid4().hex}"
    text = f"Please keep {marker} private"
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/8",
        data_dir,
        tmp_path,
        supervised=True,
        models_file=models_file,
        heartbeat_interval_s=0.5,
        openai_wait_s=30,
        log_level="DEBUG",
    )
    messages = [{"role": "user", "content": text}]
    sent: list[tuple[str, dict[str, Any], int]] = [
        # valid, through every submitting route
        ("/v1/jobs", {"model": "tiny", "prompt": text, "max_tokens": 2}, 202),
        ("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 2}, 200),
        ("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 2, "stream": True}, 200),
        ("/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 2}, 200),
        ("/v1/responses", {"model": "tiny", "input": text, "max_output_tokens": 2}, 200),
        ("/v1/responses", {"model": "tiny", "input": [{"role": "wizard", "content": text}]}, 422),
        ("/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": messages}, 200),
        ("/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": [{"role": "wizard", "content": text}]}, 400),
        ("/v1/messages/count_tokens", {"model": "tiny", "messages": messages}, 200),
        (
            "/v1/batches",
            {
                "model": "tiny",
                "requests": [{"messages": messages, "max_tokens": 2}],
                "synthesis": {"messages": [{"role": "user", "content": text + " {{results}}"}], "max_tokens": 2},
            },
            202,
        ),
        # invalid: pydantic would quote the input in its errors
        ("/v1/jobs", {"model": "tiny", "prompt": text, "max_tokens": "many"}, 422),
        ("/v1/jobs", {"model": "tiny", "messages": [{"role": "wizard", "content": text}]}, 422),
        ("/v1/jobs", {"model": "tiny", "prompt": text, "messages": messages}, 422),
        ("/v1/jobs", {"model": "tiny", "prompt": text, "surprise": text}, 422),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image", "x": text}]}]},
            422,
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": messages, "n": 2}, 422),
        ("/v1/completions", {"model": "tiny", "prompt": [text, text]}, 422),
        ("/v1/batches", {"model": "tiny", "requests": [{"messages": messages, "custom_id": "{" + text}]}, 422),
        ("/v1/jobs", {"model": "missing", "prompt": text}, 422),
        ("/v1/jobs", {"model": text, "prompt": text}, 404),
        # a job that fails in the worker
        ("/v1/jobs", {"model": "broken", "prompt": text}, 202),
        ("/v1/chat/completions", {"model": "broken", "messages": messages}, 503),
    ]
    try:
        for path, body, expected in sent:
            response = svc.http.post(path, json=body)
            assert response.status_code == expected, (path, body, response.text)
        # let the worker finish what was queued (the batch's synthesis last): nothing queued, nothing running
        deadline = time.monotonic() + 60
        while True:
            health = svc.http.get("/health").json()
            idle = not any(w.get("jobs") for w in health["workers"])
            if idle and health["queues"] == {"mlxq-interactive": 0, "mlxq-jobs": 0, "mlxq-batch": 0}:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        svc.stop()
    logs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}
    assert set(logs) == {"gateway.log", "worker.log"}
    assert all(logs.values())
    for name, content in logs.items():
        assert marker not in content, f"{name} quotes the prompt"
