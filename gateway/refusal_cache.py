"""Recent refusals, repeated from memory for a moment instead of asking Redis again.

Under a flood the same answer comes back for every request: the queue is full,
the circuit is open, this client is over its rate. After the admission script
says so once, this gateway repeats it for up to `hold_s` (never past the
refusal's own Retry-After) without building the job or calling Redis, and
counts those refusals locally, flushing the counts to Redis every second.
Authentication and the request's own shape are still checked first, in order.
Admission itself stays exact: only refusals are cached, and only briefly.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis

from shared import keys
from shared.errors import MlxqError

logger = logging.getLogger(__name__)

PER_CLIENT = frozenset({"rate_limited", "too_many_inflight"})
"""Refusals about one client; the others (queue, circuit, memory) apply to everyone."""

MAX_CLIENTS = 10_000
"""Remembered per-client refusals, at most; beyond it the oldest are forgotten."""


@dataclass(frozen=True)
class _Held:
    error: MlxqError
    until: float
    retry_at: float


class RefusalCache:
    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._global: _Held | None = None
        self._clients: dict[str, _Held] = {}
        self._uncounted: Counter[str] = Counter()

    def remember(self, client_id: str, error: MlxqError) -> None:
        """Keep a refusal the admission script just made."""
        if self.hold_s <= 0 or error.retry_after_s is None:
            return
        now = time.monotonic()
        held = _Held(error, now + min(self.hold_s, error.retry_after_s), now + error.retry_after_s)
        if error.code in PER_CLIENT:
            if len(self._clients) >= MAX_CLIENTS:
                self._clients.pop(next(iter(self._clients)))
            self._clients[client_id] = held
        else:
            self._global = held

    def check(self, client_id: str) -> MlxqError | None:
        """A refusal to repeat for this client now, with its Retry-After counted down, or None."""
        now = time.monotonic()
        held = self._global if self._global is not None and self._global.until > now else None
        if held is None:
            held = self._clients.get(client_id)
            if held is None or held.until <= now:
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
