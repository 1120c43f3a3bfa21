"""The order a worker claims jobs in, by the real scripts in a real redis-server: priority first, and
the batch tier in turns by client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from rq.serializers import JSONSerializer

from gateway.admission.admit import Admission, Tier
from gateway.admission.clients import Client
from gateway.jobs.records import JobFactory
from shared import keys
from shared.embeddings import EmbedRequest
from shared.schemas import GenerateRequest
from shared.settings import Settings
from worker.affinity import ModelAffinity
from worker.claiming import Preference, TurnTakingQueue
from worker.supervision.orphans import reclaim_claimed

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

    def admit(
        self, client: Client, count: int, queue_index: int = 2, model: str = "tiny", meta: dict[str, Any] | None = None
    ) -> list[str]:
        queue = self.queues[queue_index]
        tier: Tier = "batch" if queue_index == 2 else "single"
        factory = JobFactory(queue, self.settings)
        jobs = [factory.build(GenerateRequest(model=model, prompt="hi"), meta=meta) for _ in range(count)]

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

    def claim_ids(self) -> list[str]:
        order = []
        while (found := self.claims.dequeue_any(self.queues, None, connection=self.redis)) is not None:
            order.append(found[0].id)
        return order

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


def running(model: str, busy: bool = True, may_swap: bool = True, swap_after_s: float = 0.5) -> Preference:
    return Preference(model=model, busy=busy, may_swap=may_swap, swap_after_s=swap_after_s)


def test_a_busy_worker_takes_its_models_jobs_first_and_another_models_once_it_has_waited(queues: Queues) -> None:
    y1, x1, y2, x2 = (queues.admit(ALICE, 1, 1, model)[0] for model in ("y", "x", "y", "x"))
    queues.claims.preference = lambda: running("x")
    assert queues.claim_ids() == [x1, x2]  # the y jobs wait, in their places
    queues.claims.clock = lambda: time.time() + 0.6  # past swap_after_s: they are overdue
    queues.claims.preference = lambda: running("x", may_swap=False)
    assert queues.claim_ids() == []  # overdue, but the worker swapped less than swap_after ago
    queues.claims.preference = lambda: running("x")
    assert queues.claim_ids() == [y1, y2]


def test_an_idle_worker_takes_another_models_job_unless_a_live_worker_runs_that_model(queues: Queues) -> None:
    [y1] = queues.admit(ALICE, 1, 1, "y")
    queues.redis.hset(keys.WORKER_MODELS, "w2", "y")
    queues.redis.set(keys.worker_heartbeat("w2"), "{}", ex=10)
    queues.claims.preference = lambda: running("x", busy=False, swap_after_s=60)
    assert queues.claim_ids() == []  # left to w2, which runs y
    queues.redis.delete(keys.worker_heartbeat("w2"))  # w2 is gone
    assert queues.claim_ids() == [y1]
    assert queues.redis.hget(keys.WORKER_MODELS, "w1") == b"y"


def test_in_the_batch_tier_a_busy_worker_serves_the_client_whose_turn_is_its_model(queues: Queues) -> None:
    alice = queues.admit(ALICE, 2, 2, "y")
    bob = queues.admit(BOB, 2, 2, "x")
    queues.claims.preference = lambda: running("x", swap_after_s=60)
    assert queues.claim_ids() == bob
    queues.claims.preference = lambda: running("x", busy=False, swap_after_s=60)
    assert queues.claim_ids() == alice


def test_a_higher_priority_job_for_another_model_holds_back_lower_priority_work(queues: Queues) -> None:
    [y_interactive] = queues.admit(ALICE, 1, 0, "y")
    [x_normal] = queues.admit(ALICE, 1, 1, "x")
    queues.claims.preference = lambda: running("x", swap_after_s=60)
    assert queues.claim_ids() == []  # the batch drains instead of growing with lower-priority x work
    queues.claims.preference = lambda: running("x", busy=False, swap_after_s=60)
    assert queues.claim_ids() == [y_interactive, x_normal]


def test_a_job_waits_a_bounded_moment_for_the_worker_that_holds_its_prompts_start(queues: Queues) -> None:
    names = ["f" * 16, "e" * 16, "d" * 16]  # its blocks' routing names, deepest first
    [job] = queues.admit(ALICE, 1, queue_index=1, meta={"prefix": names})
    # w2 is live and holds the job's second-deepest block; w1 holds only its shallowest.
    for worker, held in (("w2", names[1]), ("w1", names[2])):
        queues.redis.set(keys.worker_heartbeat(worker), "{}")
        queues.redis.sadd(keys.CLAIMING_WORKERS, worker)
        queues.redis.sadd(keys.worker_prefixes(worker), held)
    w1, w2 = TurnTakingQueue.for_worker("w1"), TurnTakingQueue.for_worker("w2")
    for claims in (w1, w2):
        claims.prefix_wait_s = 3.0
    queues.redis.delete(keys.WAKE)
    assert w1.dequeue_any(queues.queues, None, connection=queues.redis) is None  # held back for w2...
    assert queues.redis.lpop(keys.WAKE) == b"held"  # ...and a wake-up passed on, in case w2 sleeps
    found = w2.dequeue_any(queues.queues, None, connection=queues.redis)
    assert found is not None and found[0].id == job

    # Once it has waited out the moment (its holder busy), any worker takes it.
    [late] = queues.admit(ALICE, 1, queue_index=1, meta={"prefix": names})
    w1.clock = lambda: time.time() + 3.5
    found = w1.dequeue_any(queues.queues, None, connection=queues.redis)
    assert found is not None and found[0].id == late


def test_a_claim_cut_off_by_an_outage_makes_the_worker_look_for_a_claimed_job_it_never_started(
    queues: Queues,
) -> None:
    """The claim script may have run with its answer lost: only then does the worker read its claimed list
    (a round trip it would otherwise make before every claim)."""
    queues.claims.answer_lost = False
    assert queues.claim_ids() == []  # an answer that came back: nothing in doubt
    assert not queues.claims.answer_lost
    gone = Redis(port=1, socket_connect_timeout=0.2)
    assert queues.claims.dequeue_any(queues.queues, None, connection=gone) is None
    assert queues.claims.answer_lost


def test_one_claim_takes_as_many_jobs_as_the_batch_has_room_for_as_separate_claims_would(queues: Queues) -> None:
    """Jobs that arrive together start together (their prompts prefilled in one piece): one script call
    claims up to the room, in the order one claim at a time would, all into the claimed list."""
    x1, x2, y1, x3 = (queues.admit(ALICE, 1, 1, model)[0] for model in ("x", "x", "y", "x"))
    queues.claims.preference = lambda: replace(running("", busy=False, swap_after_s=60), room=3)
    first = queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)
    assert first is not None and first[0].id == x1
    # The other two are claimed already, handed out with no further call: x3, not y1 (a busy worker's model).
    assert [job.id for job, _ in queues.claims.ahead] == [x2, x3]
    assert [m.decode() for m in queues.redis.lrange(keys.worker_claimed("w1"), 0, -1)] == [x1, x2, x3]
    queues.redis.delete(*[queue.key for queue in queues.queues])  # the next two come without Redis's queues
    assert [queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)[0].id for _ in range(2)] == [
        x2,
        x3,
    ]
    assert y1 not in queues.claim_ids()


def test_a_crash_suspect_is_never_claimed_beside_others(queues: Queues) -> None:
    """A job that was running when a worker died runs alone (worker/supervision/crash_suspect.py): a claim
    of several stops before it, and one that takes it takes nothing else."""
    a, b, c = queues.admit(ALICE, 3, 1)
    job = Job.fetch(b, connection=queues.redis, serializer=JSONSerializer)
    job.meta["crash_attempts"] = 1
    job.save_meta()
    queues.claims.preference = lambda: replace(running("tiny"), room=8)
    assert queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)[0].id == a  # type: ignore[index]
    assert queues.claims.ahead == []
    assert queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)[0].id == b  # type: ignore[index]
    assert queues.claims.ahead == []  # the suspect alone
    assert queues.claim_ids() == [c]


def test_an_embedding_job_is_claimed_by_a_busy_worker_at_once_and_is_no_swap(queues: Queues) -> None:
    """Embedding and rerank jobs run beside any generation (worker/engine.py): a worker generating with one
    model takes them as they come, and its model stays the one it generates with."""
    factory = JobFactory(queues.queues[1], queues.settings)
    embed = factory.build_embedding(EmbedRequest(model="vectors", inputs=["a", "b"]))

    async def admit() -> None:
        aredis = AsyncRedis.from_url(queues.settings.redis_url)
        try:
            await Admission(aredis, queues.settings, queues.queues).admit(ALICE, [embed], "single", embed.id)
        finally:
            await aredis.aclose()

    asyncio.run(admit())
    [x2] = queues.admit(ALICE, 1, 1, "x")
    queues.redis.hset(keys.WORKER_MODELS, "w1", "x")
    queues.claims.preference = lambda: replace(running("x", swap_after_s=60), room=4)
    assert queues.claim_ids() == [embed.id, x2]
    assert queues.redis.hget(keys.WORKER_MODELS, "w1") == b"x"
    affinity = ModelAffinity(queues.redis, "w1", swap_after_s=60)
    affinity.claimed(Job.fetch(x2, connection=queues.redis, serializer=JSONSerializer))
    affinity.claimed(Job.fetch(embed.id, connection=queues.redis, serializer=JSONSerializer))
    assert affinity.model == "x"


def test_a_claim_answers_each_job_as_rq_records_it_and_leaves_out_one_whose_record_is_gone(queues: Queues) -> None:
    """The claim reads the jobs' hashes itself (no fetch after it): each job handed out is the one RQ's own
    fetch gives, and a job whose hash is gone (deleted meanwhile) is left out and leaves the claimed list."""
    kept, gone = queues.admit(ALICE, 2, 1, meta={"note": "kept"})
    queues.redis.delete(Job.key_for(gone))
    queues.claims.preference = lambda: replace(running("", busy=False, swap_after_s=60), room=2)
    found = queues.claims.dequeue_any(queues.queues, None, connection=queues.redis, serializer=JSONSerializer)
    assert found is not None and found[0].id == kept and not queues.claims.ahead
    fetched = Job.fetch(kept, connection=queues.redis, serializer=JSONSerializer)
    job = found[0]
    assert (job.origin, job.meta, job.data, job.enqueued_at) == (
        fetched.origin,
        fetched.meta,
        fetched.data,
        fetched.enqueued_at,
    )
    assert found[1].key == queues.queues[1].key
    assert [m.decode() for m in queues.redis.lrange(keys.worker_claimed("w1"), 0, -1)] == [kept]


def test_jobs_claimed_take_their_wake_ups_with_them_and_leave_those_of_jobs_still_queued(queues: Queues) -> None:
    """Each admission wakes one idle worker: a wake-up left for a job claimed meanwhile would only wake a
    worker to find nothing (a round trip on its loop beside the starts of the jobs it has)."""
    x1, _, _, x3 = (queues.admit(ALICE, 1, 1, model)[0] for model in ("x", "x", "y", "x"))
    assert queues.redis.llen(keys.WAKE) == 4
    queues.claims.preference = lambda: replace(running("x", swap_after_s=60), room=2)
    first = queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)
    assert first is not None and first[0].id == x1
    assert queues.redis.llen(keys.WAKE) == 2  # for y1 and x3, still queued: another worker may take them
    queues.claims.ahead.clear()
    queues.claims.preference = lambda: replace(running("x", swap_after_s=60), room=4)
    assert queues.claims.dequeue_any(queues.queues, None, connection=queues.redis)[0].id == x3
    assert queues.redis.llen(keys.WAKE) == 1  # y1's, which this worker passes over for now
