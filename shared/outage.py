"""Redis being away, as weather: noticed once, waited out, and noticed again when it is back.

Every long-lived process (gateway, worker, watchdog) meets Redis restarts and
failovers. Instead of a traceback per failed write (one per token, while a
generation runs), the first failure of an outage is logged with what was being
done, later ones are only counted, and the end of the outage is logged with how
long it lasted and how many operations failed. One tracker per process, since
the connection to Redis is the process's; its state is read by the watchdog to
give workers time to beat again after an outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.redis_errors import RedisRefusing, condition_of

logger = logging.getLogger(__name__)

T = TypeVar("T")

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, RedisRefusing)
"""What Redis being away looks like to redis-py (BusyLoadingError, while it reads its AOF, is one), and
Redis refusing writes for now (MISCONF, READONLY, OOM, NOREPLICAS, BUSY: shared/redis_errors.py)."""

POOL_WAIT_OVER = "No connection available."
"""redis-py's BlockingConnectionPool gives up waiting for a free connection with a ConnectionError
of this message: a pool too small for the load, which is not Redis being away."""


def pool_exhausted(exc: BaseException) -> bool:
    """Whether a ConnectionError is one of the process's own pool, not of Redis."""
    if isinstance(exc, MaxConnectionsError):
        return True
    return isinstance(exc, RedisConnectionError) and str(exc) == POOL_WAIT_OVER


RETRY_MAX_S = 1.0
"""Longest pause between two tries: once Redis is back, work resumes within about this long."""


class Outage:
    """The process's view of Redis: up, or down since when and how many operations failed meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None
        self.failures = 0
        self.back_at = float("-inf")
        """time.monotonic() when the last outage ended."""
        self.pool_warned_at = float("-inf")
        self.condition: str | None = None
        self._seen: set[str] = set()
        """What this outage looks like (shared/redis_errors.py), while there is one."""
        self._on_back: list[Callable[[str, float, int], None]] = []

    def on_back(self, hook: Callable[[str, float, int], None]) -> None:
        """Call `hook(condition, lasted_s, failures)` when an outage ends (to record it in Redis, which
        could not be written during it). A hook's failure is logged, never raised."""
        self._on_back.append(hook)

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, what: str, exc: BaseException) -> None:
        if pool_exhausted(exc):
            if time.monotonic() - self.pool_warned_at > 10:
                self.pool_warned_at = time.monotonic()
                logger.warning("no Redis connection free in this process's pool while %s; Redis is not down", what)
            return
        condition = condition_of(exc)
        with self._lock:
            self.failures += 1
            self.condition = condition
            if self.since is not None and condition in self._seen:
                return
            self._seen.add(condition)  # a new look of the same outage is logged, a repeat is not
            self.since = self.since or time.monotonic()
        kind = type(exc).__name__
        logger.warning("Redis is %s (%s while %s); carrying on and retrying quietly", condition, kind, what)

    def ok(self) -> None:
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            lasted, failures, condition = time.monotonic() - self.since, self.failures, self.condition or ""
            self.since, self.failures, self.back_at, self.condition = None, 0, time.monotonic(), None
            self._seen = set()
        logger.warning("Redis is back after %.1f s (%s); %d operations failed meanwhile", lasted, condition, failures)
        for hook in self._on_back:
            try:
                hook(condition, lasted, failures)
            except Exception as exc:
                logger.warning("could not record the end of a Redis outage: %s", type(exc).__name__)


REDIS = Outage()
"""This process's tracker (module-level like a logger: Redis connectivity belongs to the process)."""


def until_redis(what: str, action: Callable[[], T]) -> T:
    """`action`'s value, trying again while Redis is unreachable (for writes that must not be lost)."""
    pause = 0.05
    while True:
        try:
            value = action()
        except UNREACHABLE as exc:
            REDIS.failed(what, exc)
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)
            continue
        REDIS.ok()
        return value


def quietly(what: str, action: Callable[[], T]) -> T | None:
    """`action`'s value; if Redis is unreachable, count it and go on with None (for what the next
    try redoes)."""
    try:
        return action()
    except UNREACHABLE as exc:
        REDIS.failed(what, exc)
        return None
    # Success is not taken as a sign that Redis is back: some of these (RQ's heartbeats) swallow errors.
