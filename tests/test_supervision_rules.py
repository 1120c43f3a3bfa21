"""The watchdog's rules on their own: backoff, restart limit, circuit transitions, the event stream."""

from __future__ import annotations

import fakeredis
import pytest
from redis import Redis

from shared import circuit, events
from shared.circuit import CircuitRecord, CircuitState
from shared.settings import Settings
from worker.supervision.restart_policy import RestartPolicy


def test_backoff_doubles_from_two_seconds_up_to_a_minute() -> None:
    policy = RestartPolicy(Settings())
    assert [policy.delay(n) for n in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]


def test_at_most_five_restarts_in_five_minutes() -> None:
    policy = RestartPolicy(Settings())
    for t in (0, 10, 20, 30, 40):
        assert policy.earliest(t) == t
        policy.record(t)
    assert policy.earliest(50) == 300  # when the first of the five leaves the window
    assert policy.earliest(301) == 301


def test_the_circuit_opens_after_five_failed_starts_and_a_trial_decides() -> None:
    record = CircuitRecord()
    for failures in range(1, 5):
        record = record.after_failed_start(now_ms=1000, threshold=5, open_ms=60_000)
        assert (record.state, record.failures) == (CircuitState.CLOSED, failures)
    record = record.after_failed_start(now_ms=1000, threshold=5, open_ms=60_000)
    assert record.state == CircuitState.OPEN
    assert record.next_trial_at_ms == 61_000
    assert not record.trial_due(60_999) and record.trial_due(61_000)

    trial = CircuitRecord(CircuitState.HALF_OPEN, record.failures, record.opened_at_ms, record.next_trial_at_ms)
    reopened = trial.after_failed_start(now_ms=70_000, threshold=5, open_ms=60_000)
    assert (reopened.state, reopened.next_trial_at_ms) == (CircuitState.OPEN, 130_000)
    assert trial.after_ready() == CircuitRecord()


def test_the_circuit_record_reads_back_as_written_and_closed_when_there_is_none() -> None:
    """Pure Redis arithmetic (a hash written and read): fakeredis, as ../STYLE.md gives it that job."""
    redis = fakeredis.FakeRedis()
    assert circuit.read(redis) == CircuitRecord()  # a Redis that came back empty: closed
    opened = CircuitRecord().after_failed_start(now_ms=5_000, threshold=1, open_ms=60_000)
    circuit.write(redis, opened)
    assert circuit.read(redis) == opened == CircuitRecord(CircuitState.OPEN, 1, 5_000, 65_000)
    circuit.write(redis, opened.after_ready())
    assert circuit.read(redis) == CircuitRecord()


def test_events_are_read_latest_first_then_followed_by_cursor(scratch_redis_url: str) -> None:
    redis = Redis.from_url(scratch_redis_url)
    for i in range(5):
        events.emit(redis, "worker_started", worker=f"w{i}")
    latest = events.read(redis, limit=2)
    assert [e["worker"] for e in latest] == ["w3", "w4"]
    events.emit(redis, "worker_ready", worker="w5")
    newer = events.read(redis, after=latest[-1]["id"])
    assert [(e["kind"], e["worker"]) for e in newer] == [("worker_ready", "w5")]
    with pytest.raises(ValueError):
        events.emit(redis, "nonsense")
