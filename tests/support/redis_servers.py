"""Throw-away redis-servers for tests, each on a free port with a directory of its own; never 6379."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from redis import Redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str:
    found = os.environ.get("MLXQ_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: run the tests through scripts/test, which installs one")
    return found


def wait_for_redis(url: str, process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Until the redis-server just started answers PING (or it died, or the time is up)."""
    client = Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


class RedisServer:
    """A throw-away redis-server on a free port with its own directory; never 6379."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(directory / "redis.log"),
            ],
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        wait_for_redis(self.url, self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class PersistentRedis:
    """A redis-server with AOF (fsync always) on a fixed port and directory, to kill and start again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.directory), "--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen([*command, "--logfile", str(self.directory / "redis.log")])
        wait_for_redis(self.url, self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
