"""The shapes that run alone (`scripts/bench --latency`, `--chat-session`, `--agent-sessions`, `--embeddings`,
`--streams`), each beside a Redis of its own, and the sections of BENCHMARKS.md they write."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts.benchmarks.admission import free_port
from scripts.benchmarks.agent_sessions import run_agent_sessions
from scripts.benchmarks.chat_session import run_chat_sessions
from scripts.benchmarks.embeddings import run_embeddings
from scripts.benchmarks.latency import run_latency
from scripts.benchmarks.streams import stop_all
from worker.demo_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]


STREAMS_HEADING = "## Streams on one gateway"


def written_by() -> str:
    """A section's first words: the command that wrote it, when, and on what machine."""
    command = "scripts/bench " + " ".join(a for a in sys.argv[1:] if a != "--write")
    cpu = platform.processor() or platform.machine()
    return (
        f"Written by `{command.strip()} --write` ({time.strftime('%Y-%m-%d')}) on {platform.system()} "
        f"{platform.release()},\n{cpu}, {os.cpu_count()} CPUs"
    )


def streams_section(table: str, args: argparse.Namespace) -> str:
    return f"""{STREAMS_HEADING}

{written_by()}. mlxq alone (mlx_lm.server has no queue to wait in): one gateway, no worker while
the streams open, so every one waits queued (`POST /v1/jobs`, then `GET /v1/jobs/{{id}}/events`); then a worker
(demo model, `MLXQ_MAX_BATCH=64`) runs them, 4 tokens each. Connections: Redis's `connected_clients` with all
open, less before (the gateway's fixed pool, `MLXQ_REDIS_CONNECTIONS`); memory: the gateway's RSS growth over
the streams; delay: a text event's arrival at its client less its stream id (the Redis time its worker wrote it).

{table}
"""


CHAT_HEADING = "## Chat sessions on three families"
EMBEDDINGS_HEADING = "## Embeddings: inputs per second beside the in-process ceiling, and the stall they cause"
AGENT_HEADING = "## Agent sessions: cold, warm, a new session, after a worker restart"
LATENCY_HEADING = "## Latency of short requests"


def latency(args: argparse.Namespace) -> str:
    """The latency shape (scripts/benchmarks/latency.py) on the demo model, with a Redis of its own."""
    return with_redis(args, "latency", lambda a, w, env, port: run_latency(a, build_tiny_model(w / "demo"), env, port))


def latency_section(table: str, args: argparse.Namespace) -> str:
    return f"""{LATENCY_HEADING}

{written_by()}; {args.rounds} rounds, 16 requests per shape and server in each.

{table}
"""


def chat_sessions(args: argparse.Namespace) -> str:
    """The chat-session shape (scripts/benchmarks/chat_session.py) with a Redis of its own."""
    return with_redis(args, "chat", run_chat_sessions)


def agent_sessions(args: argparse.Namespace) -> str:
    """The agent-sessions shape (scripts/benchmarks/agent_sessions.py) with a Redis of its own."""
    return with_redis(args, "agents", run_agent_sessions)


def embeddings(args: argparse.Namespace) -> str:
    """The embeddings shape (scripts/benchmarks/embeddings.py) with a Redis of its own."""
    return with_redis(args, "embeddings", run_embeddings)


def embeddings_section(table: str, args: argparse.Namespace) -> str:
    return f"""{EMBEDDINGS_HEADING}

{written_by()}. The shape is described in
scripts/benchmarks/embeddings.py.

{table}
"""


def agent_section(table: str, args: argparse.Namespace) -> str:
    return f"""{AGENT_HEADING}

{written_by()}: mlxq beside `mlx_lm.server` and vllm-mlx on
random-weight models (worker/tiny_families.py at hidden {args.hidden}, {args.dtype}) of a plain family (llama)
and a hybrid one (qwen3_next). The shape is described in scripts/benchmarks/agent_sessions.py.

{table}
"""


def with_redis(args: argparse.Namespace, name: str, shape: Any) -> str:
    """Runs `shape(args, workdir, env, redis_port)` beside a redis-server of its own; its table."""
    workdir = Path(tempfile.mkdtemp(prefix=f"mlxq-bench-{name}-"))
    redis_port = free_port()
    redis_bin = os.environ.get("MLXQ_TEST_REDIS_SERVER") or shutil.which("redis-server") or "redis-server"
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    redis = subprocess.Popen([redis_bin, "--port", str(redis_port), "--save", "", "--dir", str(workdir)], **quiet)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_")}
    base_env.update(HF_HUB_OFFLINE="1", MLXQ_DATA_DIR=str(workdir), MLXQ_LOG_LEVEL="warning")
    base_env.update(MLXQ_RATE_LIMIT_REQUESTS="1000000", MLXQ_MAX_INFLIGHT_PER_CLIENT="1000")
    try:
        table: str = shape(args, workdir, base_env, redis_port)
        return table
    finally:
        stop_all([redis])
        shutil.rmtree(workdir, ignore_errors=True)


def chat_section(table: str, args: argparse.Namespace) -> str:
    return f"""{CHAT_HEADING}

{written_by()}. mlxq beside `mlx_lm.server` on random-weight models of three families
(worker/tiny_families.py at hidden {args.hidden}, {args.dtype}): llama (every layer full attention), qwen3_next
(a gated delta net beside attention) and gemma3_text (64-token sliding windows beside full attention).

{table}
"""


def write_section(heading: str, section: str) -> None:
    """Puts `section` in place of the one under `heading` (to the next heading), or at the end."""
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if heading not in old:
        path.write_text(old.rstrip() + "\n\n" + section)
        return
    start = old.index(heading)
    following = old.find("\n## ", start + len(heading))
    rest = old[following + 1 :] if following >= 0 else ""
    path.write_text(old[:start] + section.rstrip() + "\n" + ("\n" + rest if rest else ""))
