"""Refusals repeated from a gateway's memory: brief, counted down, counted."""

from __future__ import annotations

import asyncio

from fakeredis import FakeAsyncRedis

from gateway.admission.refusals import RefusalCache
from shared import keys
from shared.errors import CircuitOpen, QueueFull, RateLimited, TooManyInflight


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_global_refusal_is_repeated_to_every_client_until_the_hold_ends() -> None:
    clock = Clock()
    cache = RefusalCache(hold_s=0.2, clock=clock)
    cache.remember("alice", QueueFull("full", retry_after_s=7), "single", 1)
    repeated = cache.check("bob", "single", 1)
    assert isinstance(repeated, QueueFull)
    assert repeated.retry_after_s == 7
    assert repeated.counted
    clock.now += 0.19
    assert cache.check("bob", "single", 1) is not None
    clock.now += 0.02
    assert cache.check("bob", "single", 1) is None


def test_a_per_client_refusal_is_repeated_only_to_that_client() -> None:
    cache = RefusalCache(hold_s=5)
    refusal = RateLimited("slow down", retry_after_s=2)
    refusal.extra_headers = {"x-ratelimit-remaining-requests": "0"}
    cache.remember("alice", refusal, "single", 1)
    assert cache.check("bob", "single", 1) is None
    repeated = cache.check("alice", "single", 1)
    assert isinstance(repeated, RateLimited)
    assert repeated.headers()["x-ratelimit-remaining-requests"] == "0"


def test_the_hold_never_outlasts_retry_after_and_zero_turns_it_off() -> None:
    clock = Clock()
    cache = RefusalCache(hold_s=60, clock=clock)
    cache.remember("alice", CircuitOpen("open", retry_after_s=1), "single", 1)
    clock.now += 0.5
    repeated = cache.check("alice", "single", 1)
    assert repeated is not None and repeated.retry_after_s == 1  # counted down, rounded up
    clock.now += 0.51
    assert cache.check("alice", "single", 1) is None
    off = RefusalCache(hold_s=0)
    off.remember("alice", CircuitOpen("open", retry_after_s=30), "single", 1)
    assert off.check("alice", "single", 1) is None


def test_repeated_refusals_reach_the_shared_counters_on_flush() -> None:
    """Counters added in Redis: pure arithmetic, so fakeredis (../STYLE.md gives it that job)."""
    cache = RefusalCache(hold_s=5)
    cache.remember("alice", QueueFull("full", retry_after_s=3), "single", 1)
    for _ in range(4):
        assert cache.check("alice", "single", 1) is not None

    async def flush() -> bytes | None:
        redis = FakeAsyncRedis()
        await cache.flush(redis)
        await cache.flush(redis)  # nothing new: nothing added twice
        counted: bytes | None = await redis.hget(keys.REFUSALS, "queue_full")
        await redis.aclose()
        return counted

    assert asyncio.run(flush()) == b"4"


def test_a_held_capacity_refusal_answers_only_requests_it_certainly_applies_to() -> None:
    cache = RefusalCache(hold_s=5)
    cache.remember("alice", TooManyInflight("25 more than fit", retry_after_s=30), "batch", 25)
    # A smaller batch, a single job, or a job of the other tier may well fit: they go to Redis.
    assert cache.check("alice", "batch", 5) is None
    assert cache.check("alice", "single", 25) is None
    assert isinstance(cache.check("alice", "batch", 25), TooManyInflight)
    assert isinstance(cache.check("alice", "batch", 40), TooManyInflight)
    cache.remember("bob", QueueFull("full", retry_after_s=30), "batch", 200)
    assert cache.check("carol", "single", 1) is None
    assert isinstance(cache.check("carol", "single", 200), QueueFull)
    # The rate window counts requests, whatever their size.
    cache.remember("dave", RateLimited("slow down", retry_after_s=30), "batch", 50)
    assert isinstance(cache.check("dave", "single", 1), RateLimited)
