"""mlxq beside mlx-lm's own server (`mlx_lm.server`) and vllm-mlx on the same random-weight model, same run.

Starts a redis-server, mlxq (worker + gateway) at MLXQ_MAX_BATCH=16, a second
mlxq at MLXQ_MAX_BATCH=1 (for the batching ratio), mlx_lm.server and vllm-mlx (in
a virtualenv of its own: scripts/benchmarks/peers.py), all on one random-weight
qwen2 model built offline. Then fires the same OpenAI-style load at each, in
interleaved rounds (the servers take turns within every round, so drift on a
shared, noisy machine hits all of them alike):

- concurrency C in 1, 8, 16, 32: max(16, C) streamed greedy chat completions of
  `--max-tokens` tokens, C in flight at a time; beside them the engine's ceiling,
  mlx-lm's `batch_generate` in-process on the same prompts (scripts/benchmarks/ceiling.py);
- fan-out: 16 requests at once sharing a `--prefix-tokens`-token system prompt;
- stall: 4 streams running while a long prompt arrives (scripts/benchmarks/stall.py).

Every round's prompts are new (they start with the round's number), so no server
answers one from what an earlier round left in its prompt cache. Per shape and
server it reports tokens/s (all requests' generated tokens, from the usage each
stream ends with, over the wall time), p50/p95 latency, p50 time to first token
and CPU time per token, as medians over the rounds, and mlxq's ratios to the
better peer. With `--write`, BENCHMARKS.md gets the tables, the machine, the
versions and the command.

`--chat-session` runs the chat-session shape alone (scripts/benchmarks/chat_session.py):
each turn's time to first token of a 4-turn chat on a plain, a hybrid and a
sliding-window family, mlxq beside mlx_lm.server; `--write` puts it in its own
section of BENCHMARKS.md.

`--latency` runs the latency shape alone (scripts/benchmarks/latency.py): short
chats, one at a time and 8 at once, streamed and not, cold and with a cached
prefix, mlxq beside mlx_lm.server, and what mlxq adds to the first text.

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
from scripts.benchmarks.ceiling import ceiling_tok_s  # noqa: E402
from scripts.benchmarks.peers import start_mlx_lm, start_vllm_mlx, vllm_mlx_executable  # noqa: E402
from scripts.benchmarks.sections import (  # noqa: E402
    AGENT_HEADING,
    CHAT_HEADING,
    EMBEDDINGS_HEADING,
    LATENCY_HEADING,
    STREAMS_HEADING,
    agent_section,
    agent_sessions,
    chat_section,
    chat_sessions,
    embeddings,
    embeddings_section,
    latency,
    latency_section,
    streams_section,
    write_section,
)
from scripts.benchmarks.stall import WORDS, run_stall  # noqa: E402
from scripts.benchmarks.streams import report as streams_report  # noqa: E402
from scripts.benchmarks.streams import run_streams, stop_all  # noqa: E402
from worker.demo_model import build_tiny_model  # noqa: E402


def never_ending(model_dir: Path) -> None:
    """Zero the (tied) embedding rows of the end-of-text token and of every token that is not whole
    text on its own (a byte of a multi-byte character): their logits are then 0 while the others
    spread around 0, so greedy decoding never picks them. Every request, on every server, generates
    all of `--max-tokens` (none can be told to ignore EOS in the same way), and every token shows as
    text when it is made (a run of partial characters is held back by every server until it
    completes: the stall shape would take it for a pause)."""
    import mlx.core as mx
    from tokenizers import Tokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    path = model_dir / "model.safetensors"
    weights = mx.load(str(path))
    assert isinstance(weights, dict)
    table = weights["model.embed_tokens.weight"]
    banned = [config["eos_token_id"]]
    # "": a special token (skipped when decoded) or a lone space, which servers hold back on their own
    banned += [i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i]).strip() in ("", "\ufffd")]
    keep = mx.logical_not(mx.any(mx.arange(table.shape[0])[:, None] == mx.array(banned)[None, :], axis=1))
    weights["model.embed_tokens.weight"] = mx.where(keep[:, None], table, mx.zeros_like(table))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def wait_until(url: str, timeout_s: float = 180) -> None:
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
    completion, tokens 0 when it failed; tokens from the usage every server sends at the end (text
    chunks are no measure: a random model's tokens are often partial characters, held back until
    they complete)."""
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
    tokens = 0
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                    first = first or time.perf_counter() - started
    except httpx.HTTPError:
        return 0.0, time.perf_counter() - started, 0
    return first, time.perf_counter() - started, tokens


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
    done = [c for c in calls if c[2] > 0]
    tokens = sum(c[2] for c in calls)
    if not done:
        unknown = dict.fromkeys(("cpu_ms_per_token", "p50_s", "p95_s", "ttft_s", "wall_s"), NAN)
        return {"tok_s": 0.0, "failed": len(calls), **unknown}
    latencies = sorted(c[1] for c in done)
    return {
        "cpu_ms_per_token": 1000 * (cpu_seconds(pids) - cpu_before) / max(1, tokens),
        "tok_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "ttft_s": statistics.median(c[0] for c in done),
        "wall_s": wall,
        "failed": sum(1 for c in calls if c[2] == 0),
    }


NAN = float("nan")


def prompts_for(shape: str, count: int, prefix_tokens: int, round_index: int) -> list[list[dict[str, str]]]:
    """The shape's chats for one round, all of it new to every server's prompt cache."""
    tag = f"Round {round_index + 1}, {shape}."
    if shape == "fan-out":
        shared = tag + " " + " ".join(WORDS[i % len(WORDS)] for i in range(prefix_tokens))
        return [
            [{"role": "system", "content": shared}, {"role": "user", "content": f"Part {i}: go on."}]
            for i in range(count)
        ]
    return [[{"role": "user", "content": f"{tag} Request {i}: {' '.join(WORDS[: 8 + i % 5])}"}] for i in range(count)]


def beside_mlx_lm(
    model_dir: Path, db: int, redis_port: int, env: dict[str, str], quiet: dict[str, Any]
) -> tuple[list[subprocess.Popen[bytes]], dict[str, tuple[str, str]]]:
    """mlxq (database `db`, its models file in `env`) and mlx_lm.server on `model_dir`, both answering:
    their processes, and each one's base URL and model name by name."""
    processes, mlxq = start_mlxq(16, db, None, redis_port, env, quiet)
    peer = start_mlx_lm(model_dir, free_port(), env, quiet)
    processes.append(peer.process)
    wait_until(mlxq[0] + "/health")
    wait_until(peer.base + peer.ready_path)
    return processes, {"mlxq": (mlxq[0], mlxq[1]), "mlx_lm.server": (peer.base, peer.model)}


def start_mlxq(
    batch: int,
    db: int,
    redis: subprocess.Popen[bytes] | None,
    redis_port: int,
    base_env: dict[str, str],
    quiet: dict[str, Any],
) -> tuple[list[subprocess.Popen[bytes]], tuple[str, str, list[int]]]:
    """A worker and a gateway on database `db` of the bench's Redis, whose CPU time counts as theirs."""
    port = free_port()
    env = {**base_env, "MLXQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{db}", "MLXQ_PORT": str(port)}
    env["MLXQ_MAX_BATCH"] = str(batch)
    worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, **quiet)
    gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, **quiet)
    pids = [worker.pid, gateway.pid] + ([redis.pid] if redis is not None else [])
    return [worker, gateway], (f"http://127.0.0.1:{port}", "bench", pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,16,32")
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--long-prompt-words", type=int, default=480, help="the stall's long prompt (~1,400 tokens)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random-weight model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefill-batch", type=int, default=None, help="mlxq's MLXQ_PREFILL_BATCH_SIZE")
    parser.add_argument("--prefill-pause", type=float, default=None, help="mlxq's MLXQ_PREFILL_PAUSE_STEPS")
    parser.add_argument("--no-fan-out", action="store_true", help="skip the shared-prefix fan-out shape")
    parser.add_argument("--no-stall", action="store_true", help="skip the stall shape")
    parser.add_argument("--no-vllm-mlx", action="store_true", help="leave vllm-mlx out")
    parser.add_argument("--streams", type=int, default=None, help="only the streams shape, with this many streams")
    parser.add_argument("--chat-session", action="store_true", help="only the chat-session shape, on three families")
    parser.add_argument("--latency", action="store_true", help="only the latency shape: short requests, demo model")
    parser.add_argument("--chat-system-words", type=int, default=1000, help="the chat session's system message")
    parser.add_argument("--agent-sessions", type=int, default=0, help="only the agent-sessions shape, N at once")
    parser.add_argument("--embeddings", action="store_true", help="only the embeddings shape")
    parser.add_argument("--embedding-requests", type=int, default=8, help="requests of 32 sentences a concurrency")
    parser.add_argument("--agent-turns", type=int, default=3, help="turns of each agent session")
    parser.add_argument("--agent-system-words", type=int, default=1500, help="each agent's system prompt")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    alone = [
        (args.latency, latency, LATENCY_HEADING, latency_section),
        (args.chat_session, chat_sessions, CHAT_HEADING, chat_section),
        (args.agent_sessions > 0, agent_sessions, AGENT_HEADING, agent_section),
        (args.embeddings, embeddings, EMBEDDINGS_HEADING, embeddings_section),
    ]
    for asked, run, heading, section in alone:
        if asked:
            table = run(args)
            print(table)
            if args.write:
                write_section(heading, section(table, args))
            return
    if args.streams is not None:
        result = run_streams(args.streams)
        table = streams_report(result)
        print(table)
        if args.write:
            write_section(STREAMS_HEADING, streams_section(table, args))
        return

    workdir = Path(tempfile.mkdtemp(prefix="mlxq-bench-"))
    model_dir = build_tiny_model(
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
    if args.prefill_pause is not None:
        base_env["MLXQ_PREFILL_PAUSE_STEPS"] = str(args.prefill_pause)
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    vllm_mlx = None if args.no_vllm_mlx else vllm_mlx_executable(ROOT, os.environ.get("MLXQ_MLX_EXTRA", "cpu"))
    processes = [subprocess.Popen([redis_bin, "--port", str(redis_port), "--save", "", "--dir", str(workdir)], **quiet)]
    servers: dict[str, tuple[str, str, list[int]]] = {}
    """Each server's base URL, model name and processes (for its CPU time; Redis is mlxq's)."""
    ready: list[str] = []
    for name, batch, db in (("mlxq", 16, 0), ("mlxq batch=1", 1, 1)):
        started, servers[name] = start_mlxq(batch, db, processes[0], redis_port, base_env, quiet)
        processes += started
        ready.append(servers[name][0] + "/health")
    peers = [start_mlx_lm(model_dir, free_port(), base_env, quiet)]
    if vllm_mlx is not None:
        peers.append(start_vllm_mlx(vllm_mlx, model_dir, free_port(), base_env, quiet, workdir / "vllm-home"))
    for peer in peers:
        processes.append(peer.process)
        servers[peer.name] = (peer.base, peer.model, [peer.process.pid])
        ready.append(peer.base + peer.ready_path)
    peer_names = [peer.name for peer in peers]

    levels = [int(c) for c in args.concurrency.split(",")]
    shapes = [(f"c={c}", c, max(16, c)) for c in levels] + ([] if args.no_fan_out else [("fan-out", 16, 16)])
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for url in ready:
            wait_until(url)
        for base, model, _ in servers.values():
            one_call(base, model, [{"role": "user", "content": "warm up"}], 4)  # loads the model
        for round_index in range(args.rounds):
            for shape, concurrency, count in shapes:
                names = ["mlxq", *peer_names] + (["mlxq batch=1"] if shape == "c=16" else [])
                names = names[round_index % len(names) :] + names[: round_index % len(names)]
                prompts = prompts_for(shape, count, args.prefix_tokens, round_index)
                for name in names:
                    base, model, pids = servers[name]
                    measured = run_shape(base, model, prompts, concurrency, args.max_tokens, pids)
                    results.setdefault((shape, name), []).append(measured)
                    print(f"round {round_index + 1} {shape:8} {name:14} {measured}", flush=True)
                if shape != "fan-out" and concurrency >= 8:
                    # at mlxq's batch limit here (MLXQ_MAX_BATCH=16): the peers may decode more rows at once
                    ceiling = {"tok_s": ceiling_tok_s(model_dir, prompts, args.max_tokens, min(concurrency, 16))}
                    results.setdefault((shape, "ceiling"), []).append(ceiling)
                    print(f"round {round_index + 1} {shape:8} ceiling        {ceiling}", flush=True)
            if not args.no_stall:
                names = ["mlxq", *peer_names]
                for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                    base, model, _ = servers[name]
                    stalled = run_stall(base, model, long_words=args.long_prompt_words, tag=f"Round {round_index}")
                    results.setdefault(("stall", name), []).append(stalled)
                    print(f"round {round_index + 1} stall    {name:14} {stalled}", flush=True)
                    time.sleep(2)  # the streams it hung up on end before the next server's turn
    finally:
        stop_all(processes)
        shutil.rmtree(workdir, ignore_errors=True)

    tables = report(results, shapes, peer_names, args)
    print(tables)
    if args.write:
        write_report(tables, args, peer_names)


def report(
    results: dict[tuple[str, str], list[dict[str, float]]],
    shapes: list[tuple[str, int, int]],
    peers: list[str],
    args: argparse.Namespace,
) -> str:
    def med(shape: str, name: str, key: str) -> float:
        """The median over the rounds that measured it (NaN when none did)."""
        values = [r[key] for r in results.get((shape, name), []) if key in r and r[key] == r[key]]
        return statistics.median(values) if values else NAN

    def best(values: list[float], lowest: bool) -> float:
        known = [v for v in values if v == v and v > 0]
        return (min(known) if lowest else max(known)) if known else NAN

    columns = ["mlxq", *peers]
    lines = [
        "| shape | " + " | ".join(f"{n} tok/s" for n in columns) + " | ceiling tok/s | mlxq / best peer "
        "| mlxq / ceiling | p50 latency mlxq / best | TTFT mlxq / best | CPU ms/token " + " / ".join(columns) + " |",
        "|---" * (len(columns) + 7) + "|",
    ]
    failures = []
    for shape, _, _ in shapes:
        rates = [med(shape, name, "tok_s") for name in columns]
        best_p50 = best([med(shape, name, "p50_s") for name in peers], lowest=True)
        best_ttft = best([med(shape, name, "ttft_s") for name in peers], lowest=True)
        has_ceiling = (shape, "ceiling") in results
        ceiling = med(shape, "ceiling", "tok_s") if has_ceiling else 0.0
        cpu = " / ".join(f"{med(shape, name, 'cpu_ms_per_token'):.0f}" for name in columns)
        lines.append(
            f"| {shape} | "
            + " | ".join(f"{rate:.1f}" for rate in rates)
            + (f" | {ceiling:.1f} " if has_ceiling else " | ")
            + f"| {rates[0] / best(rates[1:], lowest=False):.2f}× | "
            + (f"{rates[0] / ceiling:.2f}×" if has_ceiling else "")
            + f" | {med(shape, 'mlxq', 'p50_s') / best_p50:.2f}× | {med(shape, 'mlxq', 'ttft_s') / best_ttft:.2f}× "
            f"| {cpu} |"
        )
        failures += [
            f"{name} at {shape}: {int(sum(r['failed'] for r in results[(shape, name)]))} requests failed"
            for name in columns
            if any(r["failed"] for r in results[(shape, name)])
        ]
    lines.append("")
    lines += [f"- {failure}" for failure in failures]
    if not args.no_fan_out:
        fan_out = med("fan-out", "mlxq", "wall_s") / best([med("fan-out", name, "wall_s") for name in peers], True)
        lines.append(f"- fan-out total time, mlxq / the better peer: {fan_out:.2f}×")
    if ("c=16", "mlxq batch=1") in results:
        batching = med("c=16", "mlxq", "tok_s") / med("c=16", "mlxq batch=1", "tok_s")
        lines.append(f"- mlxq MLXQ_MAX_BATCH=16 / MLXQ_MAX_BATCH=1 throughput at concurrency 16: {batching:.2f}×")
    if ("stall", "mlxq") in results:
        lines += [
            "",
            f"Stall: 4 streams running, then a {args.long_prompt_words}-word prompt arrives.",
            "",
            "| server | median gap | longest pause | pause / median gap | long prompt's TTFT |",
            "|---|---|---|---|---|",
        ]
        for name in columns:
            failed = int(sum(r["failed"] for r in results[("stall", name)]))
            if failed:
                lines.append(f"| {name} | not measured in {failed} round(s): a stream or the long prompt failed |||| ")
            gap, pause = med("stall", name, "median_gap_s"), med("stall", name, "longest_pause_s")
            lines.append(
                f"| {name} | {gap:.3f} s | {pause:.2f} s | {med('stall', name, 'pause_in_gaps'):.1f} "
                f"| {med('stall', name, 'long_ttft_s'):.1f} s |"
            )
    return "\n".join(lines)


def write_report(table: str, args: argparse.Namespace, peers: list[str]) -> None:
    command = "scripts/bench " + " ".join(a for a in sys.argv[1:] if a != "--write")
    cpu = platform.processor() or platform.machine()
    report = f"""# Benchmarks

Written by `scripts/bench --write` ({time.strftime("%Y-%m-%d")}). Ratios are mlxq over the better of
{" and ".join(peers)} from one run with interleaved rounds (medians over {args.rounds} rounds); absolute
numbers move with the machine's load. The ceiling is mlx-lm's `batch_generate` in-process on the same
prompts at the same batch size: the decode step every server here runs, with nothing around it.

- command: `{command.strip()}`
- machine: {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs
- versions: mlx {version("mlx")}, mlx-lm {version("mlx-lm")}, rq {version("rq")}, Python {platform.python_version()}
- model: random-weight qwen2, hidden {args.hidden}, {args.layers} layers, {args.dtype}; {args.max_tokens} new
  tokens a request, greedy, streamed; fan-out: 16 requests sharing a {args.prefix_tokens}-word system prompt

{table}
"""
    old = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else ""
    sections = [old.index(heading) for heading in (STREAMS_HEADING, CHAT_HEADING) if heading in old]
    kept = old[min(sections) :] if sections else ""
    (ROOT / "BENCHMARKS.md").write_text(report + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    main()
