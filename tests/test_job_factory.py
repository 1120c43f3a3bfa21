"""The job hashes the gateway writes are exactly the ones RQ would write."""

from __future__ import annotations

import json
import zlib

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from gateway.jobs.records import JobFactory
from shared.schemas import GenerateRequest
from shared.settings import Settings
from shared.task_names import GENERATE as TASK


def test_a_prepared_job_hash_equals_rqs_own_to_dict(scratch_redis_url: str) -> None:
    settings = Settings(redis_url=scratch_redis_url)
    queue = Queue(settings.queue_name, connection=Redis.from_url(scratch_redis_url), serializer=JSONSerializer)
    request = GenerateRequest.model_validate({"model": "tiny", "prompt": "héllo", "max_tokens": 3, "stop": ["x"]})
    prepared = JobFactory(queue, settings).build(request)

    reference = queue.create_job(
        TASK,
        args=[request.model_dump(exclude_none=True)],
        timeout=settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.failure_ttl_s,
        description=f"generate model={request.model} priority=normal",
        meta={"model": request.model},
        job_id=prepared.id,
    )
    reference.created_at = reference.enqueued_at = prepared.created_at
    ours = dict(zip(prepared.fields[::2], prepared.fields[1::2], strict=True))
    theirs = {
        name.encode(): value
        if isinstance(value, bytes)
        else str.encode(value)
        if isinstance(value, str)
        else str(value).encode()
        for name, value in reference.to_dict().items()
        if value is not None
    }
    # zlib output may differ in bytes between calls only if the input differs: compare decompressed too.
    assert json.loads(zlib.decompress(ours.pop(b"data"))) == json.loads(zlib.decompress(theirs.pop(b"data")))
    assert ours == theirs
    assert prepared.queue_key == queue.key


def test_rq_reads_a_prepared_job_back(scratch_redis_url: str) -> None:
    redis = Redis.from_url(scratch_redis_url)
    settings = Settings(redis_url=scratch_redis_url)
    queue = Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)
    request = GenerateRequest.model_validate({"model": "tiny", "prompt": "hi"})
    prepared = JobFactory(queue, settings).build(request)
    redis.hset(f"rq:job:{prepared.id}", mapping=dict(zip(prepared.fields[::2], prepared.fields[1::2], strict=True)))
    job = Job.fetch(prepared.id, connection=redis, serializer=JSONSerializer)
    assert job.func_name == TASK
    assert job.args == [GenerateRequest(model="tiny", prompt="hi").model_dump(exclude_none=True)]
    assert job.get_status() == "queued"
    assert job.origin == settings.queue_name
    assert job.timeout == settings.job_timeout_s
    assert job.meta == {"model": "tiny"}


def test_every_task_name_the_gateway_enqueues_is_a_worker_function() -> None:
    import importlib

    from shared import task_names

    for name in (task_names.GENERATE, task_names.SYNTHESIZE):
        module, function = name.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), function)), name
