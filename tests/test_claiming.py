"""The order a worker claims jobs in, by the real scripts in a real redis-server: priority first, and
the batch tier in turns by client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from rq.serializers import JSONSerializer

from gateway.admission import Admission, Tier
from gateway.clients import Client
from gateway.jobs import JobFactory
from shared import keys
from shared.schemas import GenerateRequest
from shared.settings import Settings
from worker.claiming import TurnTakingQueue
from worker.orphans import reclaim_claimed

ALICE, BOB, CAROL = Client("key:alice"), Client("key:bob"), Client("key:carol")


class Queues:
    def __init__(self, url: str) -> None:
        self.settings = Settings(redis_url=url, rate_limit_requests=1000)
        self.redis = Redis.from_url(url)
        self.queues = [
            TurnTakingQueue(name, connection=self.redis, serializer=JSONSerializer)
            for name in self.settings.queue_names
        ]
        self.owner: dict[str, str] = {}
        self.claims = TurnTakingQueue.for_worker("w1")

    def admit(self, client: Client, count: int, queue_index: int = 2) -> list[str]:
        queue = self.queues[queue_index]
        tier: Tier = "batch" if queue_index == 2 else "single"
        factory = JobFactory(queue, self.settings)
        jobs = [factory.build(GenerateRequest(model="demo", prompt="hi")) for _ in range(count)]

        async def run() -> None:
            aredis = AsyncRedis.from_url(self.settings.redis_url)
            try:
                await Admission(aredis, self.settings, self.queues).admit(client, jobs, tier, jobs[0].id)
            finally:
                await aredis.aclose()

        asyncio.run(run())
        for job in jobs:
            self.owner[job.id] = client.id
        return [job.id for job in jobs]

    def claim_all(self) -> list[str]:
        """Who owns each job, in the order a worker claims them."""
        order = []
        while (found := self.claims.dequeue_any(self.queues, None, connection=self.redis)) is not None:
            order.append(self.owner.get(found[0].id, found[0].id))
        return order


@pytest.fixture
def queues(scratch_redis_url: str) -> Iterator[Queues]:
    q = Queues(scratch_redis_url)
    yield q
    q.redis.close()


def test_batch_jobs_of_different_clients_are_claimed_in_turns(queues: Queues) -> None:
    queues.admit(ALICE, 5)
    queues.admit(BOB, 2)
    queues.admit(CAROL, 1)
    a, b, c = ALICE.id, BOB.id, CAROL.id
    assert queues.claim_all() == [a, b, c, a, b, a, a, a]


def test_higher_priorities_come_first_and_a_client_that_comes_back_rejoins_the_turns(queues: Queues) -> None:
    queues.admit(ALICE, 3)
    queues.admit(BOB, 1, queue_index=0)
    queues.admit(CAROL, 1, queue_index=1)
    a, b, c = ALICE.id, BOB.id, CAROL.id
    assert queues.claim_all() == [b, c, a, a, a]
    queues.admit(ALICE, 2)
    queues.admit(BOB, 2)
    assert queues.claim_all() == [a, b, a, b]


def test_a_job_put_back_at_the_front_goes_first_and_a_canceled_one_is_skipped(queues: Queues) -> None:
    alice = queues.admit(ALICE, 3)
    queues.admit(BOB, 1)
    batch = queues.queues[2]
    first = queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)
    assert first is not None and first[0].id == alice[0]
    # As the watchdog does after a crash: back at the front of its queue.
    batch.enqueue_job(first[0], at_front=True)
    Job.fetch(alice[1], connection=queues.redis, serializer=JSONSerializer).cancel()
    a, b = ALICE.id, BOB.id
    assert queues.claim_all() == [a, b, a]
    assert queues.redis.llen(batch.key) == 0


def test_a_job_claimed_by_a_worker_that_died_before_starting_it_goes_back_first_in_line(queues: Queues) -> None:
    alice = queues.admit(ALICE, 2)
    first = queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)
    assert first is not None and first[0].id == alice[0]
    assert queues.redis.lrange(keys.worker_claimed("w1"), 0, -1) == [alice[0].encode()]
    # w1 is killed here, before RQ records the job as started: the watchdog puts it back.
    [back] = reclaim_claimed(queues.redis, "w1", stream_ttl_s=60)
    assert back.job_id == alice[0] and not back.quarantined
    assert queues.redis.llen(keys.worker_claimed("w1")) == 0
    assert reclaim_claimed(queues.redis, "w1", stream_ttl_s=60) == []  # exactly once
    assert [job for job in queues.claim_all()] == [ALICE.id, ALICE.id]
