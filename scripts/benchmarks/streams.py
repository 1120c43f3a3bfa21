"""Many streams on one gateway: what each costs it, and how late each token reaches its client.

Starts a redis-server and one gateway with no worker, opens N job streams
(`POST /v1/jobs`, then `GET /v1/jobs/{id}/events`) that wait in the queue, and
measures with all of them open: the Redis connections the gateway holds (Redis's
`connected_clients` against the count before) and the gateway's resident memory
per stream. Then a worker starts and the jobs run; each text event's id is the
Redis time (ms) its worker wrote it, so the client's clock at arrival less that
id is the delay from the token's publication to its client (same machine, same
clock). Reported: streams opened and completed, connections, memory per stream,
p50/p99 delay, the time for all to finish and the gateway's CPU time meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.benchmarks.admission import free_port  # noqa: E402


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _follow(client: httpx.AsyncClient, job_id: str, opened: list[int], delays: list[float]) -> bool:
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        response.raise_for_status()
        opened.append(1)
        event, entry_id = "", ""
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                entry_id = line[4:]
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "text":
                delays.append(time.time() * 1000 - int(entry_id.split("-")[0]))
            elif line.startswith("data: ") and event == "end":
                return '"finished"' in line
    return False


async def _run(base: str, count: int, max_tokens: int, on_open: Any) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=count + 20, max_keepalive_connections=count + 20)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        body = {"model": "demo", "prompt": "Go", "max_tokens": max_tokens, "ignore_eos": True, "priority": "normal"}
        ids = []
        for start in range(0, count, 100):
            wave = min(100, count - start)
            replies = await asyncio.gather(*(client.post("/v1/jobs", json=body) for _ in range(wave)))
            for reply in replies:
                reply.raise_for_status()
                ids.append(reply.json()["id"])
        opened: list[int] = []
        delays: list[float] = []
        tasks = [asyncio.create_task(_follow(client, job_id, opened, delays)) for job_id in ids]
        while len(opened) < count and not any(t.done() for t in tasks):
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # settled: every follower subscribed and idle
        measured = await asyncio.to_thread(on_open)
        started = time.perf_counter()
        finished = await asyncio.gather(*tasks, return_exceptions=True)
        return {
            **measured,
            "opened": len(opened),
            "completed": sum(1 for f in finished if f is True),
            "drain_s": time.perf_counter() - started,
            "delays": delays,
        }


def run_streams(count: int, max_tokens: int = 4, max_batch: int = 64) -> dict[str, Any]:
    _raise_file_limit()
    workdir = Path(tempfile.mkdtemp(prefix="mlxq-streams-"))
    redis_port, port = free_port(), free_port()
    redis_bin = os.environ.get("MLXQ_TEST_REDIS_SERVER") or shutil.which("redis-server") or "redis-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_")}
    env.update(
        HF_HUB_OFFLINE="1",
        MLXQ_DATA_DIR=str(workdir),
        MLXQ_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        MLXQ_PORT=str(port),
        MLXQ_LOG_LEVEL="warning",
        MLXQ_RATE_LIMIT_REQUESTS="1000000",
        MLXQ_MAX_INFLIGHT_PER_CLIENT=str(count * 2),
        MLXQ_MAX_QUEUED=str(count * 2),
        MLXQ_MAX_BATCH=str(max_batch),
    )
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    processes = [subprocess.Popen([redis_bin, "--port", str(redis_port), "--save", "", "--dir", str(workdir)], **quiet)]
    base = f"http://127.0.0.1:{port}"
    try:
        gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, **quiet)
        processes.append(gateway)
        _wait_answering(base)
        redis = Redis(port=redis_port)
        clients_before = int(redis.info("clients")["connected_clients"])
        rss_before = psutil.Process(gateway.pid).memory_info().rss

        def cpu_s() -> float:
            times = psutil.Process(gateway.pid).cpu_times()
            return float(times.user + times.system)

        def with_all_open() -> dict[str, Any]:
            measured = {
                "cpu_at_open_s": cpu_s(),
                "redis_connections": int(redis.info("clients")["connected_clients"]) - clients_before,
                "rss_per_stream_kib": (psutil.Process(gateway.pid).memory_info().rss - rss_before) / count / 1024,
            }
            processes.append(subprocess.Popen([sys.executable, "-m", "worker"], env=env, **quiet))
            return measured

        result = asyncio.run(_run(base, count, max_tokens, with_all_open))
        result["gateway_cpu_s"] = cpu_s() - result.pop("cpu_at_open_s")
    finally:
        stop_all(processes)
        shutil.rmtree(workdir, ignore_errors=True)
    delays = sorted(result.pop("delays"))
    result["p50_delay_ms"] = statistics.median(delays) if delays else float("nan")
    result["p99_delay_ms"] = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))] if delays else float("nan")
    result["streams"] = count
    return result


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop what a benchmark started, the last started first; nothing may outlive it and skew the next."""
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_answering(base: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(base + "/health", timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def report(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| streams | opened | completed | gateway's Redis connections | gateway memory / stream "
            "| token delay p50 | token delay p99 | all done in | gateway CPU while they ran |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {result['streams']} | {result['opened']} | {result['completed']} | {result['redis_connections']} "
            f"| {result['rss_per_stream_kib']:.1f} KiB | {result['p50_delay_ms']:.0f} ms "
            f"| {result['p99_delay_ms']:.0f} ms | {result['drain_s']:.1f} s | {result['gateway_cpu_s']:.1f} s |",
        ]
    )
