"""Admission throughput of one gateway process, as a ratio to a bare FastAPI + Redis INCR endpoint.

Servers run side by side under the same uvicorn settings against one fresh
redis-server: the peer (`peer_app.py`), a gateway that admits everything, and a
gateway whose queue limit is 0, so every request is refused at the last check:
once as configured by default (repeats served from the refusal cache for 0.5 s)
and once with the cache off, so that every refusal runs the whole admission script. The load comes from `load.py` in a
separate process, in short rounds that visit each server in turn; medians are
reported. Everything is on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def load(port: int, path: str, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "scripts/benchmarks/load.py"), path, str(port), BODY, str(args.concurrency)]
    out = subprocess.run([*command, str(seconds)], check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per server per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    redis_server = os.environ.get("MLXQ_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if not redis_server:
        sys.exit("no redis-server found (scripts/bench_admission installs one)")
    workdir = Path(tempfile.mkdtemp(prefix="mlxq-bench-"))
    redis_port = free_port()
    redis = subprocess.Popen(
        [
            redis_server,
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_")}
        env.update(
            MLXQ_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            MLXQ_DATA_DIR=str(workdir / "data"),
            MLXQ_LOG_LEVEL="warning",  # no access log, for ours and the peer alike
            MLXQ_RATE_LIMIT_REQUESTS="100000000",
            MLXQ_MAX_INFLIGHT_PER_CLIENT="100000000",
            MLXQ_MAX_QUEUED="100000000",
            PYTHONPATH=str(ROOT),
        )
        uvicorn = [sys.executable, "-m", "uvicorn", "--log-level", "warning", "--no-access-log", "--no-proxy-headers"]
        gateway = [sys.executable, "-m", "gateway"]
        # name -> (command, extra environment, path, the status that counts)
        targets = {
            "peer": (uvicorn + ["scripts.benchmarks.peer_app:app", "--port", "{port}"], {}, "/incr", "202"),
            "admitted": (gateway, {}, "/v1/jobs", "202"),
            "refused": (gateway, {"MLXQ_MAX_QUEUED": "0"}, "/v1/jobs", "503"),
            "refused_by_script": (gateway, {"MLXQ_MAX_QUEUED": "0", "MLXQ_REFUSAL_HOLD_S": "0"}, "/v1/jobs", "503"),
        }
        servers = {}
        for name, (command, extra, _path, _) in targets.items():
            port = free_port()
            servers[name] = (
                port,
                subprocess.Popen(
                    [part.replace("{port}", str(port)) for part in command],
                    cwd=ROOT,
                    env={**env, **extra, "MLXQ_PORT": str(port)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        try:
            for name, (port, _) in servers.items():
                wait_http(f"http://127.0.0.1:{port}/docs")
                load(port, targets[name][2], args, 1.0)  # warm-up
            # Short rounds, the servers taking turns, so that a noisy neighbour hurts them alike.
            rates: dict[str, list[float]] = {name: [] for name in targets}
            others: dict[str, dict[str, int]] = {name: {} for name in targets}
            for _ in range(args.rounds):
                for name, (port, _) in servers.items():
                    result = load(port, targets[name][2], args, args.seconds)
                    counted = targets[name][3]
                    rates[name].append(result["status"].get(counted, 0) / result["seconds"])
                    for status, count in result["status"].items():
                        if status != counted:
                            others[name][status] = others[name].get(status, 0) + count
        finally:
            for _, process in servers.values():
                process.terminate()
                process.wait(10)
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    peer_rate, admit_rate, refuse_rate, script_rate = (
        statistics.median(rates[name]) for name in ("peer", "admitted", "refused", "refused_by_script")
    )
    report = {
        "peer_incr_per_s": round(peer_rate, 1),
        "admitted_per_s": round(admit_rate, 1),
        "refused_per_s": round(refuse_rate, 1),
        "admitted_ratio": round(admit_rate / peer_rate, 3),
        "refused_ratio": round(refuse_rate / peer_rate, 3),
        "refused_by_script_per_s": round(script_rate, 1),
        "refused_by_script_ratio": round(script_rate / peer_rate, 3),
        "rounds": {name: [round(rate, 1) for rate in values] for name, values in rates.items()},
        "unexpected_statuses": others,
        "concurrency": args.concurrency,
        "seconds_per_round": args.seconds,
    }
    print(
        f"bare FastAPI + Redis INCR: {peer_rate:8.1f} req/s\n"
        f"mlxq admitted submits:     {admit_rate:8.1f} req/s  ({admit_rate / peer_rate:.0%} of the peer; aim 50%)\n"
        f"mlxq refused (queue_full): {refuse_rate:8.1f} req/s  ({refuse_rate / peer_rate:.0%} of the peer; aim 80%)\n"
        f"  ... refusal cache off:   {script_rate:8.1f} req/s  ({script_rate / peer_rate:.0%} of the peer)"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
