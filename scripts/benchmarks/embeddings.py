"""The embeddings shape: inputs per second, and what an embedding flood does to running chat streams.

A random-weight BERT (worker/demo_model.py's embedding model at hidden 128, 2
layers: MLX's CPU backend embeds a few sentences a second at a real encoder's size) is served by mlxq and by vllm-mlx
(`--embedding-model`, mlx-embeddings too), beside the bench's chat model. Requests
of 32 sentences each are sent at 1, 8 and 64 at once; each server's inputs per
second is set against the ceiling: mlx-embeddings in this process, the same
model, batches of 32 back to back. Then the stall: four chat streams decode, an
embedding flood (64 requests at once) arrives, and the streams' longest pause while
it runs is set against their median gap before it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from scripts.benchmarks.stall import WORDS, _stream
from scripts.benchmarks.streams import stop_all
from worker.demo_model import build_embedding_model, build_tiny_model

SENTENCES = 32
CONCURRENCY = (1, 8, 64)
BERT = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}


def sentences(request: int) -> list[str]:
    return [
        f"Request {request}, sentence {n}: " + " ".join(WORDS[(n + k) % len(WORDS)] for k in range(8 + n % 24))
        for n in range(SENTENCES)
    ]


def ceiling(model_dir: Path, requests: int) -> float:
    """Inputs per second of mlx-embeddings in this process: batches of 32, padded to their longest."""
    from worker import embedding

    model, tokenizer = embedding.read(model_dir)
    batches = [[list(tokenizer.encode(s)) for s in sentences(r)] for r in range(requests)]
    pad = embedding.pad_id(tokenizer)
    embedding.forward(model, batches[0], pad)  # warm
    started = time.perf_counter()
    for rows in batches:
        embedding.forward(model, rows, pad)
    return requests * SENTENCES / (time.perf_counter() - started)


def clients(count: int) -> queue.Queue[httpx.Client]:
    """HTTP clients made before a flood, as an SDK's are made once: on this 2-core machine a new httpx client
    costs some 40 ms of CPU (its TLS context), and sixteen made at a flood's start took both cores from the
    server for a third of a second, which the stall then counted as the server's."""
    made: queue.Queue[httpx.Client] = queue.Queue()
    for _ in range(count):
        made.put(httpx.Client(timeout=3600))
    return made


def flood(
    base: str, model: str, concurrency: int, requests: int, made: queue.Queue[httpx.Client] | None = None
) -> float:
    """Inputs per second over `requests` requests of 32 sentences, `concurrency` at once, on clients `made`
    beforehand (or now, before the clock starts); 0 when one failed."""
    made = made if made is not None else clients(concurrency)

    def one(index: int) -> bool:
        body = {"model": model, "input": sentences(index), "encoding_format": "float"}
        client = made.get()
        try:
            response = client.post(base + "/v1/embeddings", json=body)
        except httpx.HTTPError:
            return False
        finally:
            made.put(client)
        return response.status_code == 200 and len(response.json().get("data", [])) == SENTENCES

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        answered = list(pool.map(one, range(requests)))
    took = time.perf_counter() - started
    while not made.empty():
        made.get().close()
    return requests * SENTENCES / took if all(answered) else 0.0


def stall(base: str, chat_model: str, embed_model: str) -> float:
    """The streams' longest pause while a flood of 16 requests ran, in their median gaps before it."""
    stop = threading.Event()
    arrivals: list[list[float]] = [[] for _ in range(4)]
    body = {"model": chat_model, "max_tokens": 4000, "temperature": 0.0, "stream": True}
    threads = [
        threading.Thread(
            target=_stream,
            args=(base, {**body, "messages": [{"role": "user", "content": f"stream {i}"}]}, arrivals[i], stop),
        )
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 600
    while any(len(a) < 20 for a in arrivals) and time.monotonic() < deadline:
        time.sleep(0.05)
    made = clients(16)
    began = time.perf_counter()
    flood(base, embed_model, 16, 16, made)
    ended = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(30)
    before = [b - a for times in arrivals for a, b in zip(times, times[1:], strict=False) if b < began]
    merged = sorted(t for times in arrivals for t in times if began <= t <= ended)
    pauses = [b - a for a, b in zip([began, *merged], [*merged, ended], strict=False)]
    if not before or not pauses:
        return float("nan")
    return max(pauses) / statistics.median(before)


def run_embeddings(args: Any, workdir: Path, base_env: dict[str, str], redis_port: int) -> str:
    from scripts.benchmarks.agent_sessions import mlxq_env
    from scripts.benchmarks.peers import vllm_mlx_executable
    from scripts.benchmarks.serving import ROOT, free_port, wait_until

    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    embed_dir = build_embedding_model(workdir / "models" / "bench-embed", **BERT)
    chat_dir = build_tiny_model(workdir / "models" / "bench", hidden_size=args.hidden, torch_dtype=args.dtype)
    models = workdir / "embeddings.toml"
    models.write_text(f'[models.bench]\npath = "{chat_dir}"\n[models.bench-embed]\npath = "{embed_dir}"\n')
    requests = args.embedding_requests
    top = ceiling(embed_dir, requests)  # batches back to back: the same at any concurrency
    rows: dict[str, dict[str, float]] = {"ceiling (mlx-embeddings in-process)": {f"c={c}": top for c in CONCURRENCY}}

    servers: dict[str, tuple[list[subprocess.Popen[bytes]], str, str, str]] = {}
    env = mlxq_env({**base_env, "MLXQ_MODELS_FILE": str(models)}, 6, redis_port)
    worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, **quiet)
    gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, **quiet)
    servers["mlxq"] = ([worker, gateway], f"http://127.0.0.1:{env['MLXQ_PORT']}", "bench", "bench-embed")
    vllm_mlx = None if args.no_vllm_mlx else vllm_mlx_executable(ROOT, os.environ.get("MLXQ_MLX_EXTRA", "cpu"))
    if vllm_mlx is not None:
        port = free_port()
        command = [str(vllm_mlx), "serve", str(chat_dir), "--served-model-name", "bench", "--port", str(port)]
        command += ["--continuous-batching", "--embedding-model", str(embed_dir)]
        home = workdir / "vllm-home"
        home.mkdir(parents=True, exist_ok=True)
        peer = subprocess.Popen(command, env={**base_env, "HOME": str(home)}, **quiet)
        servers["vllm-mlx"] = ([peer], f"http://127.0.0.1:{port}", "bench", str(embed_dir))
    try:
        for name, (_, base, chat, embed) in servers.items():
            wait_until(base + "/health")
            flood(base, embed, 1, 1)  # loads the model
            rows[name] = {f"c={c}": flood(base, embed, c, max(requests, c)) for c in CONCURRENCY}
            print(f"embeddings {name}: inputs per second {json.dumps(rows[name])}", flush=True)
            rows[name]["stall"] = stall(base, chat, embed)
            print(f"embeddings {name}: {json.dumps(rows[name])}", flush=True)
    finally:
        for processes, *_ in servers.values():
            stop_all(processes)
    return table(rows, requests)


def table(rows: dict[str, dict[str, float]], requests: int) -> str:
    ceiling_row = rows["ceiling (mlx-embeddings in-process)"]
    lines = [
        f"Embeddings: requests of {SENTENCES} sentences ({requests} a concurrency, or as many as the concurrency),"
        " inputs per second, and each over the ceiling; the stall is chat streams' longest pause during a flood of"
        " 16 requests at once, in their median gaps before it.",
        "",
        "| server | " + " | ".join(f"c={c} inputs/s" for c in CONCURRENCY) + " | c=64 / ceiling | stall |",
        "|---|" + "---|" * (len(CONCURRENCY) + 2),
    ]
    for name, row in rows.items():
        cells = " | ".join(f"{row.get(f'c={c}', float('nan')):.0f}" for c in CONCURRENCY)
        ratio = row.get("c=64", float("nan")) / ceiling_row["c=64"]
        stalled = row.get("stall")
        lines.append(f"| {name} | {cells} | {ratio:.2f}× | {'' if stalled is None else f'{stalled:.1f}×'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run it through scripts/bench --embeddings")
