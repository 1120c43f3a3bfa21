"""A Redis that comes back empty (no AOF, a new instance): the worker registers again, /health lists
it within seconds, and the first request after the restart is admitted, not refused. Real gateway,
watchdog, worker and redis-server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.support.processes import Service
from tests.support.redis_servers import PersistentRedis
from tests.test_watchdog import FAST

pytestmark = pytest.mark.slow


def test_a_redis_that_comes_back_empty_is_noticed_and_served_again(
    persistent_redis: PersistentRedis, data_dir: Path, tmp_path: Path
) -> None:
    svc = Service(persistent_redis.url, data_dir, tmp_path, supervised=True, **FAST)
    try:
        worker_pid = svc.worker_pid()
        persistent_redis.kill()
        shutil.rmtree(persistent_redis.directory / "appendonlydir", ignore_errors=True)
        persistent_redis.start()
        first = svc.http.post("/v1/jobs", json={"model": "tiny", "prompt": "Again", "max_tokens": 4})
        assert first.status_code == 202, first.text
        deadline = time.monotonic() + 30
        while True:
            health = svc.http.get("/health")
            if health.status_code == 200 and [w["pid"] for w in health.json()["workers"]] == [worker_pid]:
                break
            assert time.monotonic() < deadline, health.text
            time.sleep(0.2)
        assert svc.wait_for(first.json()["id"], {"finished", "failed"}, timeout_s=60)["status"] == "finished"
        assert svc.worker_pid() == worker_pid
    finally:
        svc.stop()
