"""mlxq beside mlx-lm's own server (`mlx_lm.server`) on the same random-weight model, same run.

Starts a redis-server, mlxq (worker + gateway) at MLXQ_MAX_BATCH=16, a second
mlxq at MLXQ_MAX_BATCH=1 (for the batching ratio), and mlx_lm.server, all on one
random-weight qwen2 model built offline. Then fires the same OpenAI-style load at
each, in interleaved rounds (the servers take turns within every round, so drift
on a shared, noisy machine hits all of them alike):

- concurrency C in 1, 8, 16, 32: max(16, C) streamed greedy chat completions of
  `--max-tokens` tokens, C in flight at a time;
- fan-out: 16 requests at once sharing a `--prefix-tokens`-token system prompt.

Per shape and server it reports tokens/s (all requests' generated tokens, from the
usage each stream ends with, over the wall time), p50/p95 latency and p50 time to
first token, as medians over the rounds, and the ratio mlxq / mlx_lm.server. With
`--write`, BENCHMARKS.md gets the table, the machine, the versions and the command.

`--streams N` runs the streams shape alone (scripts/benchmarks/streams.py): N
streams waiting on one gateway, its Redis connections and memory per stream, and
the delay from a token's publication to its client; `--write` puts it in its own
section of BENCHMARKS.md, which the other shapes' `--write` keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.benchmarks.admission import free_port  # noqa: E402
from scripts.benchmarks.streams import report as streams_report  # noqa: E402
from scripts.benchmarks.streams import run_streams, stop_all  # noqa: E402
from worker.demo_model import build_demo_model  # noqa: E402

WORDS = "the sea the sky a ship sails north under a grey moon while gulls call".split()


def never_ending(model_dir: Path) -> None:
    """Zero the end-of-text token's (tied) embedding row: its logit is then 0 while the others spread
    around 0, so greedy decoding never picks it and every request, on both servers, generates all of
    `--max-tokens` (neither can be told to ignore EOS in the same way)."""
    import mlx.core as mx

    config = json.loads((model_dir / "config.json").read_text())
    path = model_dir / "model.safetensors"
    weights = mx.load(str(path))
    assert isinstance(weights, dict)
    table = weights["model.embed_tokens.weight"]
    eos = config["eos_token_id"]
    keep = mx.arange(table.shape[0])[:, None] != eos
    weights["model.embed_tokens.weight"] = mx.where(keep, table, mx.zeros_like(table))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def wait_until(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.2)


def one_call(base: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, tokens generated) of one streamed greedy chat
    completion; tokens from the usage both servers send at the end (text chunks are no measure:
    a random model's tokens are often partial characters, held back until they complete)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = 0.0
    chunks = 0
    tokens = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, tokens or chunks


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes have used so far (their threads included)."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def run_shape(
    base: str, model: str, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int, pids: list[int]
) -> dict[str, float]:
    cpu_before = cpu_seconds(pids)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        calls = list(pool.map(lambda messages: one_call(base, model, messages, max_tokens), prompts))
    wall = time.perf_counter() - started
    latencies = sorted(c[1] for c in calls)
    tokens = sum(c[2] for c in calls)
    return {
        "cpu_ms_per_token": 1000 * (cpu_seconds(pids) - cpu_before) / max(1, tokens),
        "tok_s": sum(c[2] for c in calls) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "ttft_s": statistics.median(c[0] for c in calls),
        "wall_s": wall,
    }


def prompts_for(shape: str, count: int, prefix_tokens: int) -> list[list[dict[str, str]]]:
    if shape == "fan-out":
        shared = " ".join(WORDS[i % len(WORDS)] for i in range(prefix_tokens))
        return [
            [{"role": "system", "content": shared}, {"role": "user", "content": f"Part {i}: go on."}]
            for i in range(count)
        ]
    return [[{"role": "user", "content": f"Request {i}: {' '.join(WORDS[: 8 + i % 5])}"}] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,16,32")
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random-weight model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefill-batch", type=int, default=None, help="mlxq's MLXQ_PREFILL_BATCH_SIZE")
    parser.add_argument("--no-fan-out", action="store_true", help="skip the shared-prefix fan-out shape")
    parser.add_argument("--streams", type=int, default=None, help="only the streams shape, with this many streams")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    if args.streams is not None:
        result = run_streams(args.streams)
        table = streams_report(result)
        print(table)
        if args.write:
            write_section(STREAMS_HEADING, streams_section(table, args))
        return

    workdir = Path(tempfile.mkdtemp(prefix="mlxq-bench-"))
    model_dir = build_demo_model(
        workdir / "models" / "bench",
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(4, args.hidden // 64),
        num_key_value_heads=max(2, args.hidden // 256),
        torch_dtype=args.dtype,
    )
    never_ending(model_dir)
    models_file = workdir / "models.toml"
    models_file.write_text(f'[models.bench]\npath = "{model_dir}"\n')
    redis_port = free_port()
    redis_bin = os.environ.get("MLXQ_TEST_REDIS_SERVER") or shutil.which("redis-server") or "redis-server"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_")}
    base_env.update(HF_HUB_OFFLINE="1", MLXQ_DATA_DIR=str(workdir), MLXQ_MODELS_FILE=str(models_file))
    base_env.update(MLXQ_LOG_LEVEL="warning", MLXQ_RATE_LIMIT_REQUESTS="1000000", MLXQ_MAX_INFLIGHT_PER_CLIENT="1000")
    if args.prefill_batch is not None:
        base_env["MLXQ_PREFILL_BATCH_SIZE"] = str(args.prefill_batch)
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    processes = [subprocess.Popen([redis_bin, "--port", str(redis_port), "--save", "", "--dir", str(workdir)], **quiet)]
    servers: dict[str, tuple[str, str]] = {}
    pids: dict[str, list[int]] = {}
    """Each server's processes, for its CPU time: mlxq's worker, gateway and its share of Redis."""
    for name, batch, db in (("mlxq", 16, 0), ("mlxq batch=1", 1, 1)):
        port = free_port()
        env = {**base_env, "MLXQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{db}", "MLXQ_PORT": str(port)}
        env["MLXQ_MAX_BATCH"] = str(batch)
        processes.append(subprocess.Popen([sys.executable, "-m", "worker"], env=env, **quiet))
        processes.append(subprocess.Popen([sys.executable, "-m", "gateway"], env=env, **quiet))
        servers[name] = (f"http://127.0.0.1:{port}", "bench")
        pids[name] = [processes[0].pid, processes[-2].pid, processes[-1].pid]
    peer_port = free_port()
    processes.append(
        subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(peer_port)],
            env=base_env,
            **quiet,
        )
    )
    servers["mlx_lm.server"] = (f"http://127.0.0.1:{peer_port}", str(model_dir))
    pids["mlx_lm.server"] = [processes[-1].pid]

    levels = [int(c) for c in args.concurrency.split(",")]
    shapes = [(f"c={c}", c, max(16, c)) for c in levels] + ([] if args.no_fan_out else [("fan-out", 16, 16)])
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        wait_until(servers["mlxq"][0] + "/health")
        wait_until(servers["mlxq batch=1"][0] + "/health")
        wait_until(servers["mlx_lm.server"][0] + "/v1/models")
        for base, model in servers.values():
            one_call(base, model, [{"role": "user", "content": "warm up"}], 4)  # loads the model
        for round_index in range(args.rounds):
            for shape, concurrency, count in shapes:
                names = ["mlxq", "mlx_lm.server"]
                if shape == "c=16":
                    names.append("mlxq batch=1")
                if round_index % 2:
                    names.reverse()
                prompts = prompts_for(shape, count, args.prefix_tokens)
                for name in names:
                    base, model = servers[name]
                    results.setdefault((shape, name), []).append(
                        run_shape(base, model, prompts, concurrency, args.max_tokens, pids[name])
                    )
                    print(f"round {round_index + 1} {shape:8} {name:14} {results[(shape, name)][-1]}", flush=True)
    finally:
        stop_all(processes)
        shutil.rmtree(workdir, ignore_errors=True)

    def med(shape: str, name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(shape, name)])

    lines = [
        "| shape | mlxq tok/s | mlx_lm.server tok/s | throughput ratio | p50 latency ratio | p95 latency ratio "
        "| TTFT ratio | CPU ms/token mlxq | CPU ms/token mlx_lm.server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, _, _ in shapes:
        ours, peer = (med(shape, "mlxq", "tok_s"), med(shape, "mlx_lm.server", "tok_s"))
        ratios = [med(shape, "mlxq", key) / med(shape, "mlx_lm.server", key) for key in ("p50_s", "p95_s", "ttft_s")]
        cpu = [med(shape, name, "cpu_ms_per_token") for name in ("mlxq", "mlx_lm.server")]
        lines.append(
            f"| {shape} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f}× | {ratios[0]:.2f}× | {ratios[1]:.2f}× "
            f"| {ratios[2]:.2f}× | {cpu[0]:.0f} | {cpu[1]:.0f} |"
        )
    lines.append("")
    if not args.no_fan_out:
        fan_out = med("fan-out", "mlxq", "wall_s") / med("fan-out", "mlx_lm.server", "wall_s")
        lines.append(f"- fan-out total time, mlxq / mlx_lm.server: {fan_out:.2f}×")
    if ("c=16", "mlxq batch=1") in results:
        batching = med("c=16", "mlxq", "tok_s") / med("c=16", "mlxq batch=1", "tok_s")
        lines.append(f"- mlxq MLXQ_MAX_BATCH=16 / MLXQ_MAX_BATCH=1 throughput at concurrency 16: {batching:.2f}×")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_report(table, args)


def write_report(table: str, args: argparse.Namespace) -> None:
    command = "scripts/bench " + " ".join(a for a in sys.argv[1:] if a != "--write")
    cpu = platform.processor() or platform.machine()
    report = f"""# Benchmarks

Written by `scripts/bench --write` ({time.strftime("%Y-%m-%d")}). Ratios are mlxq / mlx_lm.server from one
run with interleaved rounds (medians over {args.rounds} rounds); absolute numbers move with the machine's load.

- command: `{command.strip()}`
- machine: {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs
- versions: mlx {version("mlx")}, mlx-lm {version("mlx-lm")}, rq {version("rq")}, Python {platform.python_version()}
- model: random-weight qwen2, hidden {args.hidden}, {args.layers} layers, {args.dtype}; {args.max_tokens} new
  tokens a request, greedy, streamed; fan-out: 16 requests sharing a {args.prefix_tokens}-word system prompt

{table}
"""
    old = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else ""
    kept = old[old.index(STREAMS_HEADING) :] if STREAMS_HEADING in old else ""
    (ROOT / "BENCHMARKS.md").write_text(report + ("\n" + kept if kept else ""))


STREAMS_HEADING = "## Streams on one gateway"


def streams_section(table: str, args: argparse.Namespace) -> str:
    command = "scripts/bench " + " ".join(a for a in sys.argv[1:] if a != "--write")
    cpu = platform.processor() or platform.machine()
    return f"""{STREAMS_HEADING}

Written by `{command.strip()} --write` ({time.strftime("%Y-%m-%d")}) on {platform.system()} {platform.release()},
{cpu}, {os.cpu_count()} CPUs. mlxq alone (mlx_lm.server has no queue to wait in): one gateway, no worker while
the streams open, so every one waits queued (`POST /v1/jobs`, then `GET /v1/jobs/{{id}}/events`); then a worker
(demo model, `MLXQ_MAX_BATCH=64`) runs them, 4 tokens each. Connections: Redis's `connected_clients` with all
open, less before (the gateway's fixed pool, `MLXQ_REDIS_CONNECTIONS`); memory: the gateway's RSS growth over
the streams; delay: a text event's arrival at its client less its stream id (the Redis time its worker wrote it).

{table}
"""


def write_section(heading: str, section: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    head = old[: old.index(heading)] if heading in old else old.rstrip() + "\n\n"
    path.write_text(head + section)


if __name__ == "__main__":
    main()
