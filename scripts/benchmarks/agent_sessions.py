"""The agent-sessions shape: what an agent's turns cost cold, warm, in a new session and after a restart.

For a plain and a hybrid family (worker/tiny_families.py, at the bench's size), each
server serves the same random-weight model in turn: mlxq, `mlx_lm.server` and
vllm-mlx (its own prefix cache on disk, in a HOME of its own). S sessions run at
once, each with a long system prompt and tool list of its own (as an agent's):

- cold: each session's first turn, nothing kept anywhere;
- warm: turns 2..T, each the previous turns plus a short user message;
- new session: S more sessions at once, each with the system prompt and tools of
  one of the first S and a new first message (a team's second agent, a sub-agent);
- after a restart: mlxq's worker killed (SIGKILL: nothing written on the way out)
  and the one its watchdog starts in its place waited for until it has loaded the model
  again; a peer's process stopped (SIGTERM, so it may save what it keeps), started again
  and waited for until its health answers (its model loaded); then each first session's
  next turn.

Each phase's time to first token is the median over its sessions; its ratio is to
the cold turn's. Every round's prompts are new, so only what a server kept within
the round can help it.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from scripts.benchmarks.stall import WORDS
from scripts.benchmarks.streams import stop_all
from worker.tiny_families import build_family_model

FAMILIES = {"plain": "llama", "hybrid": "qwen3_next"}
PHASES = ("cold", "warm", "new session", "after restart")


def system_prompt(round_index: int, session: int, words: int) -> str:
    tools = " ".join(f"tool_{n}(path, text): {' '.join(WORDS[n % len(WORDS) :][:6])}." for n in range(40))
    body = " ".join(WORDS[(i * 7 + session) % len(WORDS)] for i in range(words))
    return f"Round {round_index + 1}, agent {session}. {body}\nTools: {tools}"


class Session:
    def __init__(self, system: str, opening: str) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        self.opening = opening

    def turn(self, base: str, model: str, max_tokens: int) -> float:
        """One more turn; its time to first token (NaN when it failed)."""
        from scripts.benchmarks.serving import one_call

        n = sum(m["role"] == "user" for m in self.messages)
        self.messages.append({"role": "user", "content": f"{self.opening} Turn {n}: {' '.join(WORDS[n : n + 12])}"})
        first, _, tokens = one_call(base, model, self.messages, max_tokens)
        self.messages.append({"role": "assistant", "content": " ".join(WORDS[n * 3 : n * 3 + max_tokens])})
        return first if tokens and first else float("nan")


def at_once(sessions: list[Session], base: str, model: str, max_tokens: int) -> list[float]:
    with concurrent.futures.ThreadPoolExecutor(len(sessions)) as pool:
        return list(pool.map(lambda s: s.turn(base, model, max_tokens), sessions))


class Server:
    """One server under test, restartable: its processes, base URL and model name."""

    def __init__(self, name: str, start: Any) -> None:
        self.name = name
        self._start = start
        self.processes, self.base, self.model = start(first=True)

    def restart(self) -> None:
        self.processes, self.base, self.model = self._start(first=False, running=self.processes)


def run_agent_sessions(args: Any, workdir: Path, base_env: dict[str, str], redis_port: int) -> str:
    """Runs the shape on each family and returns its table."""
    from scripts.benchmarks.peers import vllm_mlx_executable
    from scripts.benchmarks.serving import ROOT, one_call

    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    size = {"hidden_size": args.hidden, "intermediate_size": args.hidden * 4, "torch_dtype": args.dtype}
    vllm_mlx = None if args.no_vllm_mlx else vllm_mlx_executable(ROOT, os.environ.get("MLXQ_MLX_EXTRA", "cpu"))
    results: dict[tuple[str, str, str], list[float]] = {}
    for db, (kind, family) in enumerate(FAMILIES.items(), start=4):
        model_dir = build_family_model(workdir / "models" / family, family, **size)
        env = {**base_env, "MLXQ_MODELS_FILE": str(workdir / f"{family}.toml")}
        Path(env["MLXQ_MODELS_FILE"]).write_text(f'[models.bench]\npath = "{model_dir}"\n')

        starts = servers(model_dir, mlxq_env(env, db, redis_port), env, quiet, vllm_mlx, workdir / f"vllm-{family}")
        for name, start in starts.items():
            server = Server(name, start)
            try:
                one_call(server.base, server.model, [{"role": "user", "content": "warm up"}], 4)
                for round_index in range(args.rounds):
                    for phase, took in phases(server, round_index, args).items():
                        results.setdefault((kind, name, phase), []).extend(took)
                    print(f"round {round_index + 1} agent sessions {kind:7} {name:14} done", flush=True)
            finally:
                stop_all(server.processes)
                time.sleep(1)
    return table(results, args, [n for n in ("mlxq", "mlx_lm.server", "vllm-mlx") if any(k[1] == n for k in results)])


def servers(
    model_dir: Path,
    mlxq: dict[str, str],
    env: dict[str, str],
    quiet: dict[str, Any],
    vllm_mlx: Path | None,
    vllm_home: Path,
) -> dict[str, Any]:
    """Each server's start (and restart) on `model_dir`, by name."""
    from scripts.benchmarks.peers import start_mlx_lm, start_vllm_mlx
    from scripts.benchmarks.serving import free_port, wait_until

    def peer(starter: Any) -> Any:
        def start(first: bool, running: list[subprocess.Popen[bytes]] | None = None) -> Any:
            if running:
                stop_all(running)  # stopped, not killed: a peer may write its caches on the way out
            started = starter(free_port())
            wait_until(started.base + started.ready_path)
            return [started.process], started.base, started.model

        return start

    starts: dict[str, Any] = {
        "mlxq": mlxq_with(mlxq, quiet),
        "mlx_lm.server": peer(lambda port: start_mlx_lm(model_dir, port, env, quiet)),
    }
    if vllm_mlx is not None:
        starts["vllm-mlx"] = peer(lambda port: start_vllm_mlx(vllm_mlx, model_dir, port, env, quiet, vllm_home))
    return starts


def mlxq_env(env: dict[str, str], db: int, redis_port: int) -> dict[str, str]:
    from scripts.benchmarks.serving import free_port

    return {
        **env,
        "MLXQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{db}",
        "MLXQ_PORT": str(free_port()),
        "MLXQ_MAX_BATCH": "16",
    }


def mlxq_with(env: dict[str, str], quiet: dict[str, Any]) -> Any:
    """mlxq's start and restart: a gateway and the watchdog with its worker, as `scripts/run` starts them; a
    restart kills the worker (SIGKILL: nothing written on the way out) and waits for the one the watchdog
    starts in its place."""
    from scripts.benchmarks.serving import wait_until

    base = f"http://127.0.0.1:{env['MLXQ_PORT']}"

    def start(first: bool, running: list[subprocess.Popen[bytes]] | None = None) -> Any:
        if first:
            watchdog = subprocess.Popen([sys.executable, "-m", "worker.watchdog"], env=env, **quiet)
            gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, **quiet)
            wait_until(base + "/health")
            return [watchdog, gateway], base, "bench"
        assert running is not None
        [dead] = [w["pid"] for w in httpx.get(base + "/health", timeout=10).json()["workers"]]
        os.kill(dead, signal.SIGKILL)
        # Ready as a peer is when the bench's clock starts again: the new worker has loaded the model the dead
        # one held (a peer's restart is timed from its health answering, its model loaded).
        wait_worker(base, lambda w: w.get("pid") != dead and any(m.get("name") == "bench" for m in w["models"] or []))
        return running, base, "bench"

    return start


def wait_worker(base: str, wanted: Any, timeout_s: float = 180) -> None:
    """Until a live worker (its fields in /health) is `wanted`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if any(wanted(w) for w in httpx.get(base + "/health", timeout=2).json().get("workers", [])):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("the restarted worker did not come up")


def phases(server: Server, round_index: int, args: Any) -> dict[str, list[float]]:
    """Each phase's times to first token, one per session (per turn, for the warm phase)."""
    count, words, tokens = args.agent_sessions, args.agent_system_words, args.max_tokens
    first = [Session(system_prompt(round_index, s, words), f"Task {s}.") for s in range(count)]
    took: dict[str, list[float]] = {"cold": at_once(first, server.base, server.model, tokens), "warm": []}
    for _ in range(args.agent_turns - 1):
        took["warm"] += at_once(first, server.base, server.model, tokens)
    second = [Session(system_prompt(round_index, s, words), f"Another task {s}.") for s in range(count)]
    took["new session"] = at_once(second, server.base, server.model, tokens)
    server.restart()
    took["after restart"] = at_once(first, server.base, server.model, tokens)
    return took


def table(results: dict[tuple[str, str, str], list[float]], args: Any, names: list[str]) -> str:
    def med(kind: str, name: str, phase: str) -> float:
        values = [v for v in results.get((kind, name, phase), []) if v == v]
        return statistics.median(values) if values else float("nan")

    lines = [
        f"Agent sessions: {args.agent_sessions} at once, each a {args.agent_system_words}-word system prompt and 40 "
        f"tools, {args.agent_turns} turns; time to first token (median over sessions and {args.rounds} rounds), "
        "and each phase over the cold turn.",
        "",
        "| family | server | cold | warm | new session | after restart | warm / cold | new / cold | restart / cold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, family in FAMILIES.items():
        for name in names:
            times = [med(kind, name, phase) for phase in PHASES]
            ratios = " | ".join(f"{t / times[0]:.3f}×" for t in times[1:])
            cells = " | ".join(f"{t:.3f} s" for t in times)
            lines.append(f"| {kind} ({family}) | {name} | {cells} | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run it through scripts/bench --agent-sessions")
