"""The latency shape: what the broker adds to a short request, mlxq beside `mlx_lm.server`.

Short chats (8 new tokens, greedy) on the demo model, one at a time and 8 at once,
streamed (time to the first text, and to the end) and not (time to the answer),
cold (every prompt new) and with a cached prefix (a long system message every
request shares, each with a new question). Servers take turns within each round.
The engine's part is small here, so what is left is what a server spends between
the engine and the client.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from scripts.benchmarks.admission import free_port
from scripts.benchmarks.peers import start_vllm_mlx, vllm_mlx_executable
from scripts.benchmarks.stall import WORDS
from scripts.benchmarks.streams import stop_all
from shared import keys

MAX_TOKENS = 8
REQUESTS = 16
"""Requests per shape and server in a round."""


_clients = threading.local()


def client() -> httpx.Client:
    """The calling thread's client: its connections are kept open between calls, as an SDK's are (a new
    connection costs this machine's httpx some 20 ms, which would drown what is measured)."""
    if not hasattr(_clients, "client"):
        _clients.client = httpx.Client(timeout=120)
    found: httpx.Client = _clients.client
    return found


Timed = tuple[float, float, str, float]
"""Seconds to the first text and to the end (NaN when the call failed), mlxq's job id ("" for a peer), and when
the request was sent (seconds since the epoch: the hops' clock, on the same machine)."""


def call(base: str, model: str, messages: list[dict[str, str]], stream: bool) -> Timed:
    """One chat completion, timed. A non-streamed call's first text is its answer."""
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream}
    sent, started = time.time(), time.perf_counter()
    first = float("nan")
    try:
        if not stream:
            response = client().post(base + "/v1/chat/completions", json=body)
            response.raise_for_status()
            done = time.perf_counter() - started
            return done, done, response.headers.get("x-mlxq-job-id", ""), sent
        with client().stream("POST", base + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            job_id = response.headers.get("x-mlxq-job-id", "")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first != first and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - started
    except httpx.HTTPError:
        return float("nan"), float("nan"), "", sent
    return first, time.perf_counter() - started, job_id, sent


def prompts(kind: str, round_index: int, count: int) -> list[list[dict[str, str]]]:
    tag = f"Round {round_index + 1} {kind}"
    if kind == "cached":
        system = " ".join(WORDS[i % len(WORDS)] for i in range(600))  # the same every round: kept
        return [
            [{"role": "system", "content": system}, {"role": "user", "content": f"{tag} {i}: hi"}] for i in range(count)
        ]
    return [[{"role": "user", "content": f"{tag} {i}: hi"}] for i in range(count)]


def run_latency(args: Any, model_dir: Path, base_env: dict[str, str], redis_port: int) -> str:
    from scripts.benchmarks.serving import ROOT, beside_mlx_lm, wait_until

    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    vllm_mlx = None if args.no_vllm_mlx else vllm_mlx_executable(ROOT, os.environ.get("MLXQ_MLX_EXTRA", "cpu"))
    models = model_dir.parent / "latency-models.toml"
    models.write_text(f'[models.bench]\npath = "{model_dir}"\n')
    base_env = {**base_env, "MLXQ_MODELS_FILE": str(models)}
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[tuple[str, str], list[Timed]] = {}
    pools: dict[int, ThreadPoolExecutor] = {}
    try:
        processes, servers = beside_mlx_lm(model_dir, 5, redis_port, base_env, quiet)
        if vllm_mlx is not None:
            home = model_dir.parent / "vllm-home"
            peer = start_vllm_mlx(vllm_mlx, model_dir, free_port(), base_env, quiet, home)
            processes.append(peer.process)
            wait_until(peer.base + peer.ready_path)
            servers[peer.name] = (peer.base, peer.model)
        for base, model in servers.values():
            for messages in prompts("cached", -1, 2):  # loads the model, and keeps the shared prefix
                call(base, model, messages, stream=False)
        shapes = [(kind, c, stream) for kind in ("cold", "cached") for c in (1, 8) for stream in (True, False)]
        names = list(servers)
        # One pool for each concurrency, its threads kept across rounds and servers: each thread's client keeps
        # its connections open, as an SDK's would, rather than pay a new client and connection each round.
        pools.update({c: ThreadPoolExecutor(c) for c in dict.fromkeys(c for _, c, _ in shapes)})
        for base, model in servers.values():
            for c, pool in pools.items():
                list(pool.map(partial(call, base, model, stream=False), prompts("warm", -1, 2 * c)))
        for round_index in range(args.rounds):
            for kind, concurrency, stream in shapes:
                shape = f"{kind} c={concurrency} {'streamed' if stream else 'whole'}"
                asked = prompts(f"{kind}{concurrency}{stream}", round_index, REQUESTS)
                for name in names[round_index % 2 :] + names[: round_index % 2]:
                    base, model = servers[name]
                    timed = list(pools[concurrency].map(partial(call, base, model, stream=stream), asked))
                    results.setdefault((shape, name), []).extend(timed)
                    first = statistics.median(t[0] for t in timed)
                    print(f"round {round_index + 1} {shape:26} {name:14} first {1000 * first:.1f} ms", flush=True)
        redis = Redis(port=redis_port, db=5)
        hops = {
            shape: mlxq_hops(servers["mlxq"][0], redis, results[(shape, "mlxq")])
            for shape in ("cold c=1 streamed", "cold c=1 whole", "cold c=8 streamed", "cold c=8 whole")
        }
    finally:
        for pool in pools.values():
            pool.shutdown()
        stop_all(processes)
    return table(results, [name for name in servers if name != "mlxq"]) + "\n\n" + hops_table(hops)


def mlxq_hops(base: str, redis: Redis, timed: list[Timed]) -> dict[str, float]:
    """Medians of mlxq's jobs' hops, all in ms from each job's enqueueing on one clock (this machine's): the
    client's send, the gateway's and worker's hops (Timings.hops_ms), the end's write (its stream id is Redis's
    clock) and the client's first text and end."""
    seen: dict[str, list[float]] = {}
    for first, done, job_id, sent in timed:
        enqueued = redis.hget(f"rq:job:{job_id}", "enqueued_at") if job_id else None
        if not enqueued:
            continue
        at = datetime.strptime(enqueued.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        job = client().get(f"{base}/v1/jobs/{job_id}").json()
        for hop, ms in ((job.get("result") or {}).get("timings") or {}).get("hops_ms", {}).items():
            seen.setdefault(hop, []).append(ms)
        last = redis.xrevrange(keys.job_stream(job_id), count=1)
        if last:
            seen.setdefault("end_written", []).append(int(last[0][0].decode().split("-")[0]) - 1000 * at)
        seen.setdefault("sent", []).append(1000 * (sent - at))
        if first == first:  # NaN: an answer with no text (the table leaves it out too)
            seen.setdefault("client's first text", []).append(1000 * (sent + first - at))
        if done == done:
            seen.setdefault("client's end", []).append(1000 * (sent + done - at))
    return {hop: statistics.median(values) for hop, values in seen.items()}


def hops_table(hops: dict[str, dict[str, float]]) -> str:
    lines = [
        "Where mlxq's milliseconds go (medians, ms from each job's enqueueing, one clock): the client's send, the "
        "request's arrival at the gateway and its admission, the worker's hops (`timings.hops_ms`), the end's "
        "write to the job's stream, and the client's first text and end.",
        "",
        "| shape | sent | received | accepted | claimed | submitted | first token | first written | generated "
        "| end written | client's first text | client's end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, at in hops.items():
        hops_in_order = (
            "sent",
            "received",
            "accepted",
            "claimed",
            "submitted",
            "first_token",
            "first_written",
            "generated",
            "end_written",
            "client's first text",
            "client's end",
        )
        lines.append(f"| {shape} | " + " | ".join(f"{at.get(hop, float('nan')):.1f}" for hop in hops_in_order) + " |")
    return "\n".join(lines)


def table(results: dict[tuple[str, str], list[Timed]], peers: list[str]) -> str:
    def stat(shape: str, name: str, quantile: float) -> float:
        values = sorted(t[0] for t in results.get((shape, name), []) if t[0] == t[0])
        if not values:
            return float("nan")
        return 1000 * values[min(len(values) - 1, round(quantile * (len(values) - 1)))]

    names = ["mlxq", *peers]
    columns = [f"{name} {q}" for q in ("p50", "p99") for name in names]
    lines = [
        f"Short chats ({MAX_TOKENS} new tokens, greedy) on the demo model: the first text of a stream (the answer of "
        "a whole one), p50 and p99 in ms, and mlxq less mlx_lm.server.",
        "",
        "| shape | " + " | ".join(columns) + " | mlxq - mlx_lm.server p50 | mlxq - mlx_lm.server p99 |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for shape in dict.fromkeys(shape for shape, _ in results):
        cells = [stat(shape, name, q) for q in (0.5, 0.99) for name in names]
        gaps = [stat(shape, "mlxq", q) - stat(shape, "mlx_lm.server", q) for q in (0.5, 0.99)]
        lines.append(
            f"| {shape} | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + " | "
            + " | ".join(f"{g:+.1f}" for g in gaps)
            + " |"
        )
    return "\n".join(lines)
