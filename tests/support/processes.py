"""mlxq's processes for tests: the gateway, a worker or the watchdog, and `scripts/run` as a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from tests.support.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[2]


class Process:
    """A `python -m <module>` child (or, given `command`, that command) with its output in a log file."""

    def __init__(self, module: str, env: dict[str, str], log: Path, command: list[str] | None = None) -> None:
        self.module = module
        self.log = log
        self._log_handle = log.open("ab")
        self.popen = subprocess.Popen(
            command or [sys.executable, "-m", module],
            cwd=ROOT,
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log_handle.close()
        return self.popen.returncode

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def service_env(redis_url: str, data_dir: Path, env: dict[str, str] | None = None, **overrides: Any) -> dict[str, str]:
    """The environment of a gateway or worker under test: nothing inherited from MLXQ_*; `env` is laid
    over it as it is (e.g. HF_ENDPOINT for a fake hub), `overrides` as MLXQ_<NAME>."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_")}
    environ.update(
        MLXQ_REDIS_URL=redis_url,
        MLXQ_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        # A request without max_tokens runs to the model's limit (8192 tokens of a random model);
        # tests that send none want short answers. test_context_limits.py checks the real default.
        MLXQ_DEFAULT_MAX_TOKENS="256",
        # Prefixes kept on disk outlive a test's worker in the shared data directory and would serve the
        # next test's: the tests of the disk tier (test_prefix_disk.py) turn it on in a directory of their own.
        MLXQ_PREFIX_DISK_BYTES="0",
    )
    environ.update(env or {})
    environ.update({f"MLXQ_{k.upper()}": str(v) for k, v in overrides.items() if v is not None})
    for k, v in overrides.items():
        if v is None:
            environ.pop(f"MLXQ_{k.upper()}", None)
    return environ


class Gateway:
    """A gateway process on a free port (no worker), ready when it answers."""

    def __init__(self, redis_url: str, data_dir: Path, log: Path, **overrides: Any) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process = Process("gateway", service_env(redis_url, data_dir, port=self.port, **overrides), log)
        self.wait_answering(self.base_url, self.process)

    @staticmethod
    def wait_answering(base_url: str, process: Process) -> None:
        """Until the gateway answers HTTP at all (healthy or not)."""
        deadline = time.monotonic() + 30
        while True:
            if not process.alive():
                raise RuntimeError(f"gateway exited:\n{process.tail()}")
            try:
                httpx.get(base_url + "/health", timeout=1)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.stop()


class Service:
    """A gateway and a worker (or the watchdog and its workers) against one Redis, and an HTTP client."""

    def __init__(
        self,
        redis_url: str,
        data_dir: Path,
        logs: Path,
        *,
        supervised: bool = False,
        wait: bool = True,
        worker_only: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = service_env(redis_url, data_dir, env, port=self.port, **overrides)
        worker_env = {**self.env, **{f"MLXQ_{k.upper()}": str(v) for k, v in (worker_only or {}).items()}}
        self.worker = Process("worker.watchdog" if supervised else "worker", worker_env, logs / "worker.log")
        self.gateway = Process("gateway", self.env, logs / "gateway.log")
        self.http = httpx.Client(base_url=self.base_url, timeout=10)
        if wait:
            self.wait_healthy()
        else:
            Gateway.wait_answering(self.base_url, self.gateway)

    def wait_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in (self.worker, self.gateway):
                if not process.alive():
                    raise RuntimeError(f"{process.module} exited:\n{process.tail()}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not healthy in {timeout_s} s:\n{self.worker.tail()}\n{self.gateway.tail()}")

    def submit(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        job: dict[str, Any] = response.json()
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait_for(self, job_id: str, statuses: Iterable[str], timeout_s: float = 60) -> dict[str, Any]:
        wanted = set(statuses)
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["status"] in wanted:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {job['status']}, not {wanted}, after {timeout_s} s")
            time.sleep(0.05)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.http.get("/v1/events", params={"limit": 1000}).json()["data"]
        return [e for e in found if kind is None or e["kind"] == kind]

    def wait_event(self, kind: str, count: int = 1, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Wait until at least `count` events of `kind` exist; return them."""
        deadline = time.monotonic() + timeout_s
        while len(found := self.events(kind)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} {kind} events after {timeout_s} s, wanted {count}: {self.events()}")
            time.sleep(0.1)
        return found

    def worker_pid(self, timeout_s: float = 60) -> int:
        """The pid of the (single) live worker, once it is healthy."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.http.get("/health").json()["workers"]
            if workers:
                pid: int = workers[0]["pid"]
                return pid
            if time.monotonic() > deadline:
                raise AssertionError("no live worker")
            time.sleep(0.1)

    def stop(self) -> None:
        self.http.close()
        self.gateway.stop()
        self.worker.stop()


class ScriptRun:
    """`scripts/run` as a user starts it, against a given Redis, in its own session."""

    def __init__(self, redis_url: str | None, data_dir: Path, log: Path, **overrides: Any) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = service_env(redis_url or "", data_dir, port=self.port, **overrides)
        if redis_url is None:
            del env["MLXQ_REDIS_URL"]
        self.log = log
        self._log_handle = log.open("ab")
        self.popen = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "run")],
            cwd=ROOT,
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.base_url, timeout=10)

    def wait_healthy(self, timeout_s: float = 60) -> float:
        """Seconds until /health answers 200."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.popen.poll() is not None:
                raise RuntimeError(f"scripts/run exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if self.http.get("/health").status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not healthy in {timeout_s} s:\n{self.log.read_text(errors='replace')[-3000:]}")

    def process(self, marker: str) -> Any:
        """The one process under this run whose command line contains `marker`."""
        import psutil

        def command(process: Any) -> str:
            try:
                return " ".join(process.cmdline())
            except psutil.Error:  # a process that just died (a zombie until reaped) runs nothing
                return ""

        found = [p for p in psutil.Process(self.popen.pid).children(recursive=True) if marker in command(p)]
        assert len(found) == 1, found
        return found[0]

    def stop(self) -> None:
        self.http.close()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                import psutil

                for child in psutil.Process(self.popen.pid).children(recursive=True):
                    child.kill()
                self.popen.kill()
                self.popen.wait(5)
        self._log_handle.close()
