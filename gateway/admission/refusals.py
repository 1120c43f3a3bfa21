"""Recent refusals, repeated from memory for a moment instead of asking Redis again.

Under a flood the same answer comes back for every request: the queue is full,
the circuit is open, this client is over its rate. After the admission script
says so once, this gateway repeats it for up to `hold_s` (never past the
refusal's own Retry-After) without building the job or calling Redis, and
counts those refusals locally, flushing the counts to Redis every second.
Authentication and the request's own shape are still checked first, in order.
Admission itself stays exact: only refusals are cached, and only briefly, and a
held refusal answers only a request it certainly applies to: a capacity refusal
(queue depth, in-flight cap) only one of the same tier with no fewer jobs, since
a smaller request may well fit where a wide batch did not.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis

from shared import keys
from shared.errors import MlxqError

logger = logging.getLogger(__name__)

PER_CLIENT = frozenset({"rate_limited", "too_many_inflight"})
"""Refusals about one client; the others (queue, circuit, memory) apply to everyone."""

BY_SIZE = frozenset({"too_many_inflight", "queue_full"})
"""Refusals that depend on how many jobs the request has (and, for the in-flight cap, its tier)."""

MAX_CLIENTS = 10_000
"""Remembered per-client refusals, at most; beyond it the oldest are forgotten."""


@dataclass(frozen=True)
class _Held:
    error: MlxqError
    until: float
    retry_at: float
    tier: str
    count: int

    def applies_to(self, tier: str, count: int) -> bool:
        if self.error.code not in BY_SIZE:
            return True
        return count >= self.count and (tier == self.tier or self.error.code == "queue_full")


class RefusalCache:
    def __init__(self, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._clock = clock
        """Seconds, monotonic (a test's own clock steps past a hold without sleeping through it)."""
        self._global: _Held | None = None
        self._clients: dict[str, _Held] = {}
        self._uncounted: Counter[str] = Counter()

    def remember(self, client_id: str, error: MlxqError, tier: str, count: int) -> None:
        """Keep a refusal the admission script just made for a request of `count` jobs of `tier`."""
        if self.hold_s <= 0 or error.retry_after_s is None:
            return
        now = self._clock()
        held = _Held(error, now + min(self.hold_s, error.retry_after_s), now + error.retry_after_s, tier, count)
        if error.code in PER_CLIENT:
            if len(self._clients) >= MAX_CLIENTS:
                self._clients.pop(next(iter(self._clients)))
            self._clients[client_id] = held
        else:
            self._global = held

    def check(self, client_id: str, tier: str, count: int) -> MlxqError | None:
        """A refusal to repeat for this client's request of `count` jobs of `tier` now, with its
        Retry-After counted down, or None."""
        now = self._clock()
        held = self._global
        if held is None or held.until <= now or not held.applies_to(tier, count):
            held = self._clients.get(client_id)
            if held is None or held.until <= now or not held.applies_to(tier, count):
                return None
        original = held.error
        error = type(original)(original.message, param=original.param, retry_after_s=math.ceil(held.retry_at - now))
        error.extra_headers = original.extra_headers
        error.counted = True
        self._uncounted[error.code] += 1
        return error

    async def flush(self, redis: AsyncRedis) -> None:
        """Add the refusals made from memory to the shared counters."""
        if not self._uncounted:
            return
        counts, self._uncounted = self._uncounted, Counter()
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for reason, count in counts.items():
                    pipe.hincrby(keys.REFUSALS, reason, count)
                await pipe.execute()
        except Exception:
            self._uncounted.update(counts)  # next time
            logger.warning("could not flush refusal counts; will retry")
