"""Counters and histograms kept in Redis, written by workers and the watchdog, read by `/metrics`.

Workers live in other processes (and on other machines) than the gateway that
serves `/metrics`, so their figures live in Redis, where any gateway's collector
reads them. A histogram is a hash: one field per bucket (not cumulative), plus
`sum`; its count is its buckets' total (a field of its own was one more command in
every finished job's end, read by nothing).
"""

from __future__ import annotations

import math
from typing import Any

from redis import Redis
from redis.client import Pipeline

from shared import keys
from shared.text import text

BUCKETS: dict[str, tuple[float, ...]] = {
    "queue_wait_seconds": (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    "time_to_first_token_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "generation_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    "tokens_per_second": (1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280),
}
"""Histogram names (without the `mlxq_` prefix) and their upper bounds."""


def observe(pipe: Redis | Pipeline, name: str, value: float) -> None:
    bounds = BUCKETS[name]
    bucket = next((str(b) for b in bounds if value <= b), "+Inf")
    key = keys.stats_histogram(name)
    pipe.hincrby(key, bucket, 1)
    pipe.hincrbyfloat(key, "sum", value)


def histogram(redis: Redis, name: str) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (bound, count) pairs ending with +Inf, and the sum."""
    raw = {text(k): float(v) for k, v in redis.hgetall(keys.stats_histogram(name)).items()}
    running = 0.0
    buckets = []
    for bound in [*map(str, BUCKETS[name]), "+Inf"]:
        running += raw.get(bound, 0.0)
        buckets.append((bound if bound == "+Inf" else _le(bound), running))
    return buckets, raw.get("sum", 0.0)


def count(pipe: Redis | Pipeline, counter: str, field: str, by: int = 1) -> None:
    """Add to a counter hash (`keys.STATS_JOBS` by final status, `keys.STATS_COUNTERS` by name)."""
    pipe.hincrby(counter, field, by)


def counters(redis: Redis, counter: str) -> dict[str, float]:
    return {text(k): float(v) for k, v in redis.hgetall(counter).items()}


def _le(bound: str) -> str:
    value = float(bound)
    return str(int(value)) + ".0" if math.isclose(value, round(value)) else bound


def record_generation(pipe: Redis | Pipeline, result: dict[str, Any], first_token_s: float | None) -> None:
    """What one finished generation adds to the figures."""
    timings = result["timings"]
    tokens = int(result["usage"]["completion_tokens"])
    observe(pipe, "queue_wait_seconds", float(timings["queued_s"]))
    observe(pipe, "generation_seconds", float(timings["generate_s"]))
    if first_token_s is not None:
        observe(pipe, "time_to_first_token_seconds", first_token_s)
    if tokens and timings["generate_s"] > 0:
        observe(pipe, "tokens_per_second", tokens / float(timings["generate_s"]))
    count(pipe, keys.STATS_COUNTERS, "tokens_generated", tokens)
    usage = result["usage"]
    cached = int(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))
    count(pipe, keys.STATS_COUNTERS, "prompt_tokens_computed", int(usage["prompt_tokens"]) - cached)
    count(pipe, keys.STATS_COUNTERS, "prompt_tokens_cached", cached)
