"""The circuit-breaker record: written by the watchdog, read by the gateway.

CLOSED: workers start normally. OPEN: starts keep failing; the gateway refuses
new work until `next_trial_at_ms`. HALF_OPEN: one trial start is under way.
Times are milliseconds since the epoch, by Redis's clock (`TIME`), so every
gateway and watchdog agrees on them whatever their own clocks say.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from redis import Redis

from shared import keys
from shared.text import text


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class CircuitRecord:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at_ms: int = 0
    next_trial_at_ms: int = 0

    def after_failed_start(self, now_ms: int, threshold: int, open_ms: int) -> CircuitRecord:
        """A worker died before it was ready: count it; open at `threshold`, or at once after a trial."""
        failures = self.failures + 1
        if self.state == CircuitState.HALF_OPEN or failures >= threshold:
            return CircuitRecord(CircuitState.OPEN, failures, now_ms, now_ms + open_ms)
        return replace(self, failures=failures)

    def after_ready(self) -> CircuitRecord:
        """A worker became ready: the breaker closes and the count starts over."""
        return CircuitRecord()

    def trial_due(self, now_ms: int) -> bool:
        return self.state == CircuitState.OPEN and now_ms >= self.next_trial_at_ms

    def to_mapping(self) -> dict[str, str]:
        return {
            "state": self.state.value,
            "failures": str(self.failures),
            "opened_at_ms": str(self.opened_at_ms),
            "next_trial_at_ms": str(self.next_trial_at_ms),
        }


def read(redis: Redis) -> CircuitRecord:
    raw = {text(k): text(v) for k, v in redis.hgetall(keys.CIRCUIT).items()}
    if not raw:
        return CircuitRecord()
    return CircuitRecord(
        state=CircuitState(raw.get("state", "closed")),
        failures=int(raw.get("failures", 0)),
        opened_at_ms=int(raw.get("opened_at_ms", 0)),
        next_trial_at_ms=int(raw.get("next_trial_at_ms", 0)),
    )


def write(redis: Redis, record: CircuitRecord) -> None:
    mapping: dict[Any, Any] = record.to_mapping()
    redis.hset(keys.CIRCUIT, mapping=mapping)


def redis_now_ms(redis: Redis) -> int:
    seconds, micros = redis.time()
    return int(seconds) * 1000 + int(micros) // 1000
