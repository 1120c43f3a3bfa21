"""Jobs held by a dead worker: back to the front of their queue at once, or quarantined.

RQ on its own would notice only when the job's started-registry entry expires
(its timeout + 60 s) and the next cleanup runs, and would then fail the job.
Here each one goes back to the front of its queue as soon as the worker is
known dead, with `crash_attempts` counted in its meta; a job that was running
each of `max_crash_attempts` times a worker died is failed with
`worker_crashed` instead, so one poisonous prompt cannot keep the service down.
Where the dead worker was running a suspect (a job requeued this way that had
not yet shown it was not the cause: worker/rq_worker.py), only the suspect is
counted; the jobs beside it go back as they were.
Removing the started-registry entry is the claim: whoever removes it requeues
the job, so it goes back exactly once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis import Redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job_lifecycle import record_job_failure

from shared import batch_progress, events, job_stream, keys, stats
from shared.errors import WorkerCrashed
from shared.json_bytes import JobSerializer
from shared.text import text

logger = logging.getLogger(__name__)


ENDED = {"finished", "failed", "stopped", "canceled"}
"""RQ statuses of a job that must never run again."""


@dataclass(frozen=True)
class Reclaimed:
    job_id: str
    attempts: int
    quarantined: bool


def reclaim_jobs(
    redis: Redis, worker_name: str, queues: list[Queue], max_attempts: int, stream_ttl_s: int
) -> list[Reclaimed]:
    """Requeue (or quarantine) every job the dead worker `worker_name` was running."""
    reclaimed = []
    suspect = redis.get(keys.worker_suspect(worker_name))
    for queue in queues:
        registry = queue.started_job_registry
        for member in [text(m) for m in redis.zrange(registry.key, 0, -1)]:
            job_id = member.split(":", 1)[0]
            try:
                job = Job.fetch(job_id, connection=redis, serializer=JobSerializer)
            except NoSuchJobError:
                redis.zrem(registry.key, member)
                continue
            if job.worker_name != worker_name:
                continue
            if redis.zrem(registry.key, member) != 1:
                continue  # someone else claimed it
            if job.get_status() in ENDED:
                continue  # a stale entry (an execution recorded twice across an outage): nothing to rerun
            counted = suspect is None or text(suspect) == job.id
            reclaimed.append(_reclaim(redis, job, queue, worker_name, max_attempts, stream_ttl_s, counted))
    return reclaimed


def _reclaim(
    redis: Redis, job: Job, queue: Queue, worker_name: str, max_attempts: int, stream_ttl_s: int, counted: bool
) -> Reclaimed:
    attempts = int(job.meta.get("crash_attempts", 0)) + int(counted)
    job.meta["crash_attempts"] = attempts
    if attempts >= max_attempts:
        error = WorkerCrashed(f"this job was running when the worker died {attempts} times; it is not tried again")
        job.meta["error"] = error.to_dict()
        job.save_meta()
        with redis.pipeline() as pipe:
            record_job_failure(job, f"WorkerCrashed: {error.message}", pipe)
            pipe.execute()
        queue.enqueue_dependents(job)
        batch_progress.job_ended(redis, job, "failed", stream_ttl_s, error=error.to_dict())
        stats.count(redis, keys.STATS_JOBS, "failed")
        events.emit(redis, "job_quarantined", job_id=job.id, attempts=attempts, worker=worker_name)
        logger.warning(
            "job quarantined", extra={"job_id": job.id, "model": job.meta.get("model"), "attempts": attempts}
        )
        return Reclaimed(job.id, attempts, quarantined=True)
    queue.enqueue_job(job, at_front=True)
    job_stream.append(redis, job.id, "status", stream_ttl_s, status="queued", attempts=attempts)
    events.emit(redis, "job_requeued", job_id=job.id, attempts=attempts, worker=worker_name)
    logger.info("job requeued", extra={"job_id": job.id, "model": job.meta.get("model"), "attempts": attempts})
    return Reclaimed(job.id, attempts, quarantined=False)


def reclaim_claimed(redis: Redis, worker_name: str, stream_ttl_s: int) -> list[Reclaimed]:
    """Put back, at the front of its queue, each job the dead worker popped but never started.

    Removing the id from the claimed list is the claim, as with the started registry. A job that
    got as far as started is the started registry's (reclaim_jobs); one that ended or was canceled
    meanwhile stays as it is. Attempts are not counted: the job never ran."""
    claimed = keys.worker_claimed(worker_name)
    reclaimed = []
    for job_id in [text(member) for member in redis.lrange(claimed, 0, -1)]:
        if redis.lrem(claimed, 1, job_id) != 1:
            continue
        try:
            job = Job.fetch(job_id, connection=redis, serializer=JobSerializer)
        except NoSuchJobError:
            continue
        queue = Queue(job.origin, connection=redis, serializer=JobSerializer)
        if job.get_status() != "queued" or redis.lpos(queue.key, job.id) is not None:
            continue  # started (the started registry's), ended, or already back in its queue
        queue.enqueue_job(job, at_front=True)
        job_stream.append(redis, job.id, "status", stream_ttl_s, status="queued")
        logger.info("claimed job put back", extra={"job_id": job.id, "model": job.meta.get("model")})
        reclaimed.append(Reclaimed(job.id, int(job.meta.get("crash_attempts", 0)), quarantined=False))
    return reclaimed


def forget_worker(redis: Redis, worker_name: str) -> None:
    """Clean a dead worker's records (RQ's and ours) so its successor starts clean."""
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + worker_name, connection=redis)
    if worker is not None:
        worker.register_death()
    with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.worker_heartbeat(worker_name))
        pipe.delete(keys.worker_prefixes(worker_name))  # its prompts' blocks hold no job back any more
        pipe.delete(keys.worker_commands(worker_name))
        pipe.hdel(keys.WORKER_MEMORY, worker_name)
        pipe.hdel(keys.WORKER_CAPACITY, worker_name)
        pipe.delete(keys.worker_claimed(worker_name))
        pipe.delete(keys.worker_suspect(worker_name))
        pipe.srem(keys.CLAIMING_WORKERS, worker_name)
        pipe.execute()


def prune_canceled(redis: Redis, queue_names: list[str], keep_s: int) -> int:
    """RQ never cleans its canceled registries, nor expires a canceled job: each canceled job is kept
    `keep_s` (as a failed one is), and its registry entry goes with it. Returns the entries dropped."""
    dropped = 0
    for name in queue_names:
        registry = Queue(name, connection=redis, serializer=JobSerializer).canceled_job_registry.key
        job_ids = [text(member) for member in redis.zrange(registry, 0, 999)]
        if not job_ids:
            continue
        with redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.ttl(Job.key_for(job_id))
            ttls = pipe.execute()
        gone = [job_id for job_id, ttl in zip(job_ids, ttls, strict=True) if ttl == -2]
        with redis.pipeline(transaction=False) as pipe:
            for job_id, ttl in zip(job_ids, ttls, strict=True):
                if ttl == -1:
                    pipe.expire(Job.key_for(job_id), keep_s)
            if gone:
                pipe.zrem(registry, *gone)
            pipe.execute()
        dropped += len(gone)
    return dropped
