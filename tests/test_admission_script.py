"""Each admission check, run by the real Lua script in a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from gateway.admission.admit import Admission, Admitted, Idempotency, RateState, Tier
from gateway.admission.clients import Client
from gateway.jobs.records import JobFactory, JobRecord
from shared import circuit, keys
from shared.circuit import CircuitRecord, CircuitState
from shared.errors import (
    CircuitOpen,
    IdempotencyConflict,
    InsufficientMemory,
    MlxqError,
    QueueFull,
    RateLimited,
    TooManyInflight,
)
from shared.schemas import GenerateRequest
from shared.settings import Settings

ALICE = Client("ip:10.0.0.1")
BOB = Client("ip:10.0.0.2")


class Harness:
    def __init__(self, url: str, **limits: Any) -> None:
        self.settings = Settings(redis_url=url, **limits)
        self.redis = Redis.from_url(url)
        self.queue = Queue(self.settings.queue_name, connection=self.redis, serializer=JSONSerializer)

    def job(self) -> JobRecord:
        return JobFactory(self.queue, self.settings).build(GenerateRequest(model="tiny", prompt="hi"))

    def admit(
        self, client: Client, count: int = 1, idem: Idempotency | None = None, tier: Tier = "single"
    ) -> RateState:
        decided = self.decide(client, count, idem, tier)
        assert decided.rate is not None
        return decided.rate

    def decide(
        self, client: Client, count: int = 1, idem: Idempotency | None = None, tier: Tier = "single"
    ) -> Admitted:
        async def run() -> Admitted:
            aredis = AsyncRedis.from_url(self.settings.redis_url)
            jobs = [self.job() for _ in range(count)]
            try:
                return await Admission(aredis, self.settings, [self.queue]).admit(client, jobs, tier, jobs[0].id, idem)
            finally:
                await aredis.aclose()

        return asyncio.run(run())

    def refusal(self, client: Client, count: int = 1, tier: Tier = "single") -> MlxqError:
        with pytest.raises(MlxqError) as caught:
            self.admit(client, count, tier=tier)
        return caught.value

    def refusals(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(keys.REFUSALS).items()}


@pytest.fixture
def harness(scratch_redis_url: str) -> Iterator[Harness]:
    h = Harness(scratch_redis_url, rate_limit_requests=3, max_inflight_per_client=100, max_queued=100)
    yield h
    h.redis.close()


def test_an_admitted_job_is_a_real_queued_rq_job(harness: Harness) -> None:
    state = harness.admit(ALICE)
    assert (state.limit, state.remaining) == (3, 2)
    [job_id] = harness.queue.job_ids
    job = Job.fetch(job_id, connection=harness.redis, serializer=JSONSerializer)
    assert job.get_status() == "queued"
    assert job.args[0]["prompt"] == "hi"
    assert job.enqueued_at is not None
    assert harness.queue.key.encode() in harness.redis.smembers("rq:queues")
    assert int(harness.redis.get(keys.ADMITTED) or 0) == 1


def test_rate_limit_refuses_with_retry_after_and_headers(harness: Harness) -> None:
    for _ in range(3):
        harness.admit(ALICE)
    refusal = harness.refusal(ALICE)
    assert isinstance(refusal, RateLimited)
    assert refusal.status_code == 429
    assert refusal.retry_after_s is not None and 55 <= refusal.retry_after_s <= 60
    headers = refusal.headers()
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["Retry-After"] == str(refusal.retry_after_s)
    # Another client has its own window; the refused request took no slot.
    harness.admit(BOB)
    assert len(harness.queue.job_ids) == 4
    assert harness.refusals() == {"rate_limited": 1}


def test_a_batch_is_one_request_for_the_rate_window_and_every_job_for_capacity(scratch_redis_url: str) -> None:
    h = Harness(scratch_redis_url, rate_limit_requests=3, max_batch_inflight_per_client=100, max_queued=10)
    state = h.admit(ALICE, count=4, tier="batch")
    assert (state.limit, state.remaining) == (3, 2)
    assert h.queue.count == 4
    h.admit(ALICE, count=5, tier="batch")
    # 9 queued: a 2-wide batch would pass the rate window but not the queue depth, and is refused whole.
    refusal = h.refusal(ALICE, count=2, tier="batch")
    assert isinstance(refusal, QueueFull)
    assert "adds 2" in refusal.message
    assert h.queue.count == 9
    h.admit(ALICE, count=1, tier="batch")
    assert isinstance(h.refusal(ALICE, tier="batch"), RateLimited)


def test_each_tier_has_its_own_in_flight_cap(scratch_redis_url: str) -> None:
    h = Harness(scratch_redis_url, rate_limit_requests=100, max_inflight_per_client=2, max_batch_inflight_per_client=5)
    h.admit(ALICE, count=5, tier="batch")
    h.admit(ALICE)
    h.admit(ALICE)
    assert isinstance(h.refusal(ALICE), TooManyInflight)
    refusal = h.refusal(ALICE, tier="batch")
    assert isinstance(refusal, TooManyInflight)
    assert "5 batch jobs" in refusal.message and "limit is 5" in refusal.message


def test_a_refusal_names_the_limit_that_frees_last(scratch_redis_url: str) -> None:
    h = Harness(scratch_redis_url, rate_limit_requests=1, max_queued=1, queue_full_fallback_retry_after_s=5)
    h.admit(ALICE)
    # Over the rate (free in ~60 s) and over the queue depth (fallback 5 s): the later one answers.
    refusal = h.refusal(ALICE)
    assert isinstance(refusal, RateLimited)
    assert refusal.retry_after_s is not None and refusal.retry_after_s > 5


def test_in_flight_cap_counts_queued_jobs_and_forgets_ended_ones(scratch_redis_url: str) -> None:
    h = Harness(scratch_redis_url, rate_limit_requests=100, max_inflight_per_client=2, max_queued=100)
    h.admit(ALICE)
    h.admit(ALICE)
    refusal = h.refusal(ALICE)
    assert isinstance(refusal, TooManyInflight)
    assert refusal.status_code == 429
    assert "2 jobs" in refusal.message
    # One of Alice's jobs ends: she may submit again.
    Job.fetch(h.queue.job_ids[0], connection=h.redis, serializer=JSONSerializer).set_status("finished")
    h.admit(ALICE)


def test_queue_full_retry_after_follows_the_measured_drain_rate(scratch_redis_url: str) -> None:
    h = Harness(scratch_redis_url, rate_limit_requests=100, max_queued=2, queue_full_fallback_retry_after_s=42)
    h.admit(ALICE)
    h.admit(BOB)
    # Nothing has drained yet: the fallback.
    refusal = h.refusal(ALICE)
    assert isinstance(refusal, QueueFull)
    assert refusal.retry_after_s == 42
    # Twenty jobs ended over the last 10 s: 2 per second, so one slot frees in about half a second.
    now_ms = circuit.redis_now_ms(h.redis)
    h.redis.zadd(keys.JOB_ENDS, {f"done-{i}": now_ms - 10_000 + i * 500 for i in range(20)})
    refusal = h.refusal(ALICE, count=3)  # three over the limit
    assert isinstance(refusal, QueueFull)
    assert refusal.retry_after_s == 2  # ceil(3 / 2 per s)
    assert "2 generations" in refusal.message
    assert h.refusals()["queue_full"] == 2


def test_retry_after_follows_what_the_workers_can_drain_before_any_job_ends(scratch_redis_url: str) -> None:
    h = Harness(scratch_redis_url, rate_limit_requests=100, max_queued=2, queue_full_fallback_retry_after_s=42)
    h.admit(ALICE)
    h.admit(BOB)
    now_ms = circuit.redis_now_ms(h.redis)
    # A worker that drains 2 jobs a second (its batch over its jobs' duration), none ended lately.
    h.redis.hset(keys.WORKER_CAPACITY, "w1", f"2.000 {now_ms}")
    h.redis.hset(keys.WORKER_CAPACITY, "gone", f"50.000 {now_ms - 3_600_000}")  # stale: not counted
    refusal = h.refusal(ALICE, count=3)
    assert isinstance(refusal, QueueFull)
    assert refusal.retry_after_s == 2  # ceil(3 / 2 per s)
    # A few ends long ago say less than the capacity: the capacity holds.
    h.redis.zadd(keys.JOB_ENDS, {f"done-{i}": now_ms - 200_000 + i for i in range(4)})
    refusal = h.refusal(ALICE, count=3)
    assert isinstance(refusal, QueueFull) and refusal.retry_after_s == 2


def test_an_open_circuit_refuses_until_the_trial(harness: Harness) -> None:
    now_ms = circuit.redis_now_ms(harness.redis)
    circuit.write(harness.redis, CircuitRecord(CircuitState.OPEN, 5, now_ms, now_ms + 37_000))
    refusal = harness.refusal(ALICE)
    assert isinstance(refusal, CircuitOpen)
    assert refusal.status_code == 503
    assert refusal.retry_after_s in (36, 37)
    circuit.write(harness.redis, CircuitRecord(CircuitState.HALF_OPEN, 5, now_ms, now_ms))
    harness.admit(ALICE)


def test_memory_emergency_refuses_only_when_every_fresh_worker_is_in_it(harness: Harness) -> None:
    now_ms = circuit.redis_now_ms(harness.redis)
    harness.redis.hset(keys.WORKER_MEMORY, "w1", f"99.1 {now_ms}")
    refusal = harness.refusal(ALICE)
    assert isinstance(refusal, InsufficientMemory)
    assert refusal.status_code == 503
    assert "99.1" in refusal.message
    assert refusal.retry_after_s == harness.settings.memory_retry_after_s
    # A second, healthy worker can still take work.
    harness.redis.hset(keys.WORKER_MEMORY, "w2", f"40.0 {now_ms}")
    harness.admit(ALICE)
    # A report older than the heartbeat TTL is from a dead worker and does not count.
    harness.redis.hset(keys.WORKER_MEMORY, "w2", f"40.0 {now_ms - 60_000}")
    assert isinstance(harness.refusal(ALICE), InsufficientMemory)


def test_checks_run_in_order_circuit_before_rate(harness: Harness) -> None:
    for _ in range(3):
        harness.admit(ALICE)
    now_ms = circuit.redis_now_ms(harness.redis)
    circuit.write(harness.redis, CircuitRecord(CircuitState.OPEN, 5, now_ms, now_ms + 10_000))
    assert isinstance(harness.refusal(ALICE), CircuitOpen)


def test_a_repeated_idempotency_key_returns_the_first_id_before_any_limit(harness: Harness) -> None:
    first = Idempotency("k-1", "hash-a", "job-first")
    harness.admit(ALICE, idem=first)
    for _ in range(2):
        harness.admit(ALICE)  # Alice is now at her rate limit
    repeat = harness.decide(ALICE, idem=Idempotency("k-1", "hash-a", "job-second"))
    assert repeat.duplicate_of == "job-first" and repeat.rate is None
    assert harness.queue.count == 3
    with pytest.raises(IdempotencyConflict):
        harness.decide(ALICE, idem=Idempotency("k-1", "hash-b", "job-third"))
    # Keys are per client: Bob's k-1 is his own.
    assert harness.decide(BOB, idem=Idempotency("k-1", "hash-b", "job-bob")).rate is not None


def test_a_refused_request_does_not_use_up_its_idempotency_key(harness: Harness) -> None:
    for _ in range(3):
        harness.admit(ALICE)
    with pytest.raises(RateLimited):
        harness.decide(ALICE, idem=Idempotency("k-2", "hash-a", "job-x"))
    assert not harness.redis.exists(keys.idempotency(ALICE.id, "k-2"))
