"""Streaming latency and throughput of mlxq beside mlx-lm's own server, same model, same run.

Both serve the built-in demo model (random weights, built offline) on loopback.
Each round sends one streamed chat completion (greedy, a fixed prompt) to each
server in turn, measuring the time to the first text chunk and the text chunks
per second after it. mlxq's path is the whole service: admission, an RQ job, the
worker's engine thread, a Redis Stream, the gateway's SSE. mlx-lm's is one
in-process HTTP server. Medians and ratios are printed; everything stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.admission import free_port  # noqa: E402
from shared.settings import Settings  # noqa: E402
from worker.demo_model import build_demo_model  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def wait_until(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.2)


def stream_once(base: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, text chunks per second after it, text chunks)."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    started = time.perf_counter()
    first = 0.0
    chunks = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter() - started
    total = time.perf_counter() - started
    return first, (chunks - 1) / max(total - first, 1e-9), chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxq-bench-stream-"))
    demo = build_demo_model(Settings(data_dir=workdir).demo_model_dir)
    redis_port, mlxq_port, peer_port = free_port(), free_port(), free_port()
    redis_bin = os.environ.get("MLXQ_TEST_REDIS_SERVER") or shutil.which("redis-server") or "redis-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_")}
    env.update(
        MLXQ_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        MLXQ_DATA_DIR=str(workdir),
        MLXQ_PORT=str(mlxq_port),
        MLXQ_LOG_LEVEL="warning",
        MLXQ_RATE_LIMIT_REQUESTS="1000000",
        HF_HUB_OFFLINE="1",
    )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT, "env": env}
    processes = [
        subprocess.Popen([redis_bin, "--port", str(redis_port), "--save", "", "--dir", str(workdir)], **quiet),  # type: ignore[call-overload]
        subprocess.Popen([sys.executable, "-m", "worker"], **quiet),  # type: ignore[call-overload]
        subprocess.Popen([sys.executable, "-m", "gateway"], **quiet),  # type: ignore[call-overload]
        subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(demo), "--port", str(peer_port), "--temp", "0"],
            **quiet,
        ),  # type: ignore[call-overload]
    ]
    servers = {
        "mlxq": (f"http://127.0.0.1:{mlxq_port}", "demo"),
        "mlx_lm.server": (f"http://127.0.0.1:{peer_port}", str(demo)),
    }
    try:
        wait_until(servers["mlxq"][0] + "/health")
        wait_until(servers["mlx_lm.server"][0] + "/v1/models")
        for base, model in servers.values():
            stream_once(base, model, 8)  # warm-up: loads the model
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (base, model) in servers.items():
                results[name].append(stream_once(base, model, args.max_tokens))
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    report: dict[str, Any] = {}
    for name, rows in results.items():
        report[name] = {
            "ttft_ms": round(statistics.median(r[0] for r in rows) * 1000, 1),
            "chunks_per_s": round(statistics.median(r[1] for r in rows), 1),
            "chunks": statistics.median(r[2] for r in rows),
        }
    ours, peer = report["mlxq"], report["mlx_lm.server"]
    report["ttft_ratio"] = round(ours["ttft_ms"] / peer["ttft_ms"], 2)
    report["throughput_ratio"] = round(ours["chunks_per_s"] / peer["chunks_per_s"], 2)
    print(
        f"time to first text: mlxq {ours['ttft_ms']} ms, mlx_lm.server {peer['ttft_ms']} ms "
        f"(ratio {report['ttft_ratio']})\n"
        f"streamed chunks/s:  mlxq {ours['chunks_per_s']}, mlx_lm.server {peer['chunks_per_s']} "
        f"(ratio {report['throughput_ratio']})"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
