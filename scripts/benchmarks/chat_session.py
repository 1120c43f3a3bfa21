"""The chat-session shape: an agent's turns on a plain, a hybrid and a sliding-window family.

For each family (worker/tiny_families.py, at the bench's size), mlxq and
`mlx_lm.server` each serve the same random-weight model; a chat with a long
system message takes 4 turns, each the previous turns plus a short user message,
and each turn's time to first token is measured. Servers take turns within each
round, and every round's chat is new (it starts with the round's number), so
only what a server kept from the turns before can help it. A server that resumes
each turn from the last shows turns 2-4 at a small fraction of turn 1.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.benchmarks.stall import WORDS
from scripts.benchmarks.streams import stop_all
from worker.tiny_families import build_family_model

FAMILIES = {"plain": "llama", "hybrid": "qwen3_next", "sliding window": "gemma3_text"}
TURNS = 4


def chat_messages(round_index: int, system_words: int, turn: int, answers: list[str]) -> list[dict[str, str]]:
    system = f"Round {round_index + 1}. " + " ".join(WORDS[i % len(WORDS)] for i in range(system_words))
    messages = [{"role": "system", "content": system}]
    for n in range(turn + 1):
        messages.append({"role": "user", "content": f"Turn {n}: {' '.join(WORDS[n : n + 12])}"})
        if n < turn:
            messages.append({"role": "assistant", "content": answers[n]})
    return messages


def session(base: str, model: str, round_index: int, system_words: int, max_tokens: int) -> list[float]:
    """Each turn's time to first token (seconds; NaN when it failed)."""
    from scripts.benchmarks.serving import one_call

    answers: list[str] = []
    firsts: list[float] = []
    for turn in range(TURNS):
        first, _, tokens = one_call(base, model, chat_messages(round_index, system_words, turn, answers), max_tokens)
        firsts.append(first if tokens else float("nan"))
        answers.append(" ".join(WORDS[turn * 3 : turn * 3 + max_tokens]))  # the client's record of the answer
    return firsts


def run_chat_sessions(args: Any, workdir: Path, base_env: dict[str, str], redis_port: int) -> str:
    """Runs the shape on each family and returns its table."""
    from scripts.benchmarks.serving import beside_mlx_lm, one_call

    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    size = {"hidden_size": args.hidden, "intermediate_size": args.hidden * 4, "torch_dtype": args.dtype}
    results: dict[tuple[str, str], list[list[float]]] = {}
    for db, (kind, family) in enumerate(FAMILIES.items(), start=2):
        model_dir = build_family_model(workdir / "models" / family, family, **size)
        env = {**base_env, "MLXQ_MODELS_FILE": str(workdir / f"{family}.toml")}
        Path(env["MLXQ_MODELS_FILE"]).write_text(f'[models.bench]\npath = "{model_dir}"\n')
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes, servers = beside_mlx_lm(model_dir, db, redis_port, env, quiet)
            for base, model in servers.values():
                one_call(base, model, [{"role": "user", "content": "warm up"}], 4)  # loads the model
            names = list(servers)
            for round_index in range(args.rounds):
                for name in names[round_index % 2 :] + names[: round_index % 2]:
                    base, model = servers[name]
                    firsts = session(base, model, round_index, args.chat_system_words, args.max_tokens)
                    results.setdefault((kind, name), []).append(firsts)
                    print(
                        f"round {round_index + 1} chat {kind:15} {name:14} {[round(f, 3) for f in firsts]}", flush=True
                    )
        finally:
            stop_all(processes)
            time.sleep(1)
    return table(results, args)


def table(results: dict[tuple[str, str], list[list[float]]], args: Any) -> str:
    def med(kind: str, name: str, turn: int) -> float:
        values = [r[turn] for r in results.get((kind, name), []) if r[turn] == r[turn]]
        return statistics.median(values) if values else float("nan")

    lines = [
        f"Chat session: a {args.chat_system_words}-word system message, then {TURNS} turns; time to first token "
        f"of each turn (median over {args.rounds} rounds), and turns 2-{TURNS} over turn 1.",
        "",
        "| family | server | turn 1 | turn 2 | turn 3 | turn 4 | turns 2-4 / turn 1 "
        "| mlxq / mlx_lm.server, turns 2-4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, family in FAMILIES.items():
        for name in ("mlxq", "mlx_lm.server"):
            turns = [med(kind, name, t) for t in range(TURNS)]
            later = statistics.mean(turns[1:]) / turns[0]
            versus = ""
            if name == "mlxq":
                theirs = statistics.mean(med(kind, "mlx_lm.server", t) for t in range(1, TURNS))
                versus = f"{statistics.mean(turns[1:]) / theirs:.2f}×"
            lines.append(
                f"| {kind} ({family}) | {name} | "
                + " | ".join(f"{t:.3f} s" for t in turns)
                + f" | {later:.2f}× | {versus} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run it through scripts/bench --chat-session")
