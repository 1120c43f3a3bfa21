"""A batch's progress by the real script in a real redis-server: each child's end once, the synthesis
queued once after the last, ends nobody recorded found by the sweep."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from gateway.admission.admit import Admission, BatchWrite
from gateway.admission.clients import Client
from gateway.jobs.records import JobFactory, deferred_job
from shared import batch_progress, job_stream, keys
from shared.schemas import GenerateRequest
from shared.settings import Settings

TTL_S = 60


class Batch:
    def __init__(self, url: str, width: int) -> None:
        settings = Settings(redis_url=url)
        self.redis = Redis.from_url(url)
        self.low = Queue(settings.queue_batch, connection=self.redis, serializer=JSONSerializer)
        self.normal = Queue(settings.queue_name, connection=self.redis, serializer=JSONSerializer)
        factory = JobFactory(self.low, settings)
        self.id = "batch_test"
        jobs = [
            factory.build(GenerateRequest(model="tiny", prompt="hi"), meta={"batch_id": self.id, "custom_id": f"c{i}"})
            for i in range(width)
        ]
        self.synthesis_id = "synthesis-job"
        record = {
            "id": self.id,
            "children": [{"job_id": job.id, "custom_id": f"c{i}"} for i, job in enumerate(jobs)],
            "synthesis_job_id": self.synthesis_id,
            "synthesis_queue_key": self.normal.key,
            "synthesis_registry_key": self.normal.deferred_job_registry.key,
        }
        synthesis = deferred_job(
            self.normal,
            "worker.tasks.synthesize",
            [self.id, {}],
            job_id=self.synthesis_id,
            settings=settings,
            description="synthesis",
            meta={"batch_id": self.id, "role": "synthesis"},
        )

        async def admit() -> None:
            aredis = AsyncRedis.from_url(url)
            try:
                write = BatchWrite(self.id, json.dumps(record), synthesis)
                await Admission(aredis, settings, [self.low]).admit(
                    Client("key:x"), jobs, "batch", self.id, batch=write
                )
            finally:
                await aredis.aclose()

        asyncio.run(admit())
        self.children = [Job.fetch(job.id, connection=self.redis, serializer=JSONSerializer) for job in jobs]

    def synthesis_status(self) -> str:
        return Job.fetch(self.synthesis_id, connection=self.redis, serializer=JSONSerializer).get_status()

    def events(self) -> list[tuple[str, dict[str, object]]]:
        return [job_stream.decode(fields) for _, fields in self.redis.xrange(keys.batch_stream(self.id))]


@pytest.fixture
def batch(scratch_redis_url: str) -> Iterator[Batch]:
    b = Batch(scratch_redis_url, 3)
    yield b
    b.redis.close()


def test_the_synthesis_waits_deferred_and_is_queued_once_after_the_last_child_ends(batch: Batch) -> None:
    assert batch.synthesis_status() == "deferred"
    assert batch.redis.zscore(batch.normal.deferred_job_registry.key, batch.synthesis_id) is not None
    assert batch.redis.ttl(keys.batch(batch.id)) == -1  # kept while open: the synthesis needs it
    for child in batch.children[:2]:
        batch_progress.job_ended(batch.redis, child, "finished", TTL_S, result={"usage": {"completion_tokens": 2}})
    assert batch.synthesis_status() == "deferred"
    last = batch.children[2]
    batch_progress.job_ended(batch.redis, last, "canceled", TTL_S, error={"code": "canceled"})
    batch_progress.job_ended(batch.redis, last, "canceled", TTL_S, error={"code": "canceled"})  # recorded once
    assert batch.synthesis_status() == "queued"
    assert batch.normal.job_ids == [batch.synthesis_id]
    assert batch.redis.zscore(batch.normal.deferred_job_registry.key, batch.synthesis_id) is None
    assert batch_progress.sweep(batch.redis, batch.id, TTL_S) == "done"  # nothing changes: still queued once
    assert batch.normal.job_ids == [batch.synthesis_id]
    kinds = [kind for kind, _ in batch.events()]
    assert kinds == ["child", "child", "child", "children_done"]
    assert batch.events()[0][1]["usage"] == {"completion_tokens": 2}
    assert batch.events()[3][1]["synthesis"] == {"id": batch.synthesis_id, "status": "queued"}
    assert not batch.redis.sismember(keys.OPEN_BATCHES, batch.id)
    assert 0 < batch.redis.ttl(keys.batch(batch.id)) <= keys.BATCH_KEPT_S


def test_the_sweep_finds_ends_that_nobody_recorded(batch: Batch) -> None:
    batch.children[0].set_status("finished")
    batch.children[1].set_status("stopped")
    assert not batch_progress.sweep_open(batch.redis, TTL_S)
    batch.redis.delete(batch.children[2].key)  # expired
    assert batch_progress.sweep_open(batch.redis, TTL_S) == 1
    assert batch.synthesis_status() == "queued"
    statuses = {data["custom_id"]: data["status"] for kind, data in batch.events() if kind == "child"}
    assert statuses == {"c0": "finished", "c1": "canceled", "c2": "expired"}


def test_a_canceled_synthesis_stays_canceled_when_the_children_end(batch: Batch) -> None:
    Job.fetch(batch.synthesis_id, connection=batch.redis, serializer=JSONSerializer).cancel()
    for child in batch.children:
        batch_progress.job_ended(batch.redis, child, "canceled", TTL_S)
    assert batch.synthesis_status() == "canceled"
    assert batch.normal.count == 0
    assert batch.events()[-1][1]["synthesis"] == {"id": batch.synthesis_id, "status": "canceled"}


def test_a_batch_that_is_gone_is_said_to_be_gone(batch: Batch) -> None:
    batch.redis.delete(keys.batch(batch.id))
    assert batch_progress.sweep(batch.redis, batch.id, TTL_S) == "gone"
    assert not batch.redis.sismember(keys.OPEN_BATCHES, batch.id)
