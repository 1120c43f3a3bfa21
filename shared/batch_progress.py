"""A batch's progress: each child's end recorded once, and the synthesis queued after the last.

RQ's own dependencies never release a job whose dependency was canceled, so a
batch does without them: whatever ends a child (the worker, a cancel, the
watchdog's quarantine) calls `job_ended`, which writes the job's own stream end
and, for a batch child, records it in the batch (batch_progress.lua, atomic):
one `child` entry in the batch's stream, and once every child has ended, the
synthesis moved from deferred to its queue, or an `end` entry when there is
none. `sweep` looks at RQ's statuses instead, for ends that no one recorded
(a job that expired, a process killed between the two writes); the watchdog
runs it over the open batches, and a batch's follower while it waits.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.utils import now, utcformat

from shared import job_stream, keys
from shared.text import text

SCRIPT = resources.files("shared").joinpath("batch_progress.lua").read_text()


def job_ended(redis: Redis, job: Job, status: str, ttl_s: int, **data: Any) -> None:
    """Write the end of the job's stream (finished, failed or canceled) and, for a batch child,
    record it in its batch."""
    job_stream.end(redis, job.id, status, ttl_s, **data)
    batch_id = job.meta.get("batch_id")
    custom_id = job.meta.get("custom_id")
    if not batch_id or custom_id is None or job.meta.get("role") == "synthesis":
        return
    event: dict[str, Any] = {"custom_id": custom_id, "id": job.id, "status": status}
    result = data.get("result")
    if isinstance(result, dict) and "usage" in result:
        event["usage"] = result["usage"]
        event["finish_reason"] = result.get("finish_reason")
    if data.get("error"):
        event["error"] = data["error"]
    _run(redis, batch_id, custom_id, json.dumps(event), ttl_s)


def sweep(redis: Redis, batch_id: str, ttl_s: int) -> bool:
    """Record every child that has ended by RQ's status; True once all of them have."""
    return _run(redis, batch_id, "", "", ttl_s)


def sweep_open(redis: Redis, ttl_s: int) -> int:
    """Sweep every open batch; how many were found complete."""
    done = 0
    for batch_id in [text(member) for member in redis.smembers(keys.OPEN_BATCHES)]:
        done += sweep(redis, batch_id, ttl_s)
    return done


def _run(redis: Redis, batch_id: str, custom_id: str, event: str, ttl_s: int) -> bool:
    script = redis.register_script(SCRIPT)
    reply = script(
        keys=[
            keys.batch(batch_id),
            keys.batch_ended(batch_id),
            keys.batch_stream(batch_id),
            Queue.redis_queues_keys,
            keys.OPEN_BATCHES,
        ],
        args=[custom_id, event, utcformat(now()), ttl_s, Job.redis_job_namespace_prefix, batch_id],
    )
    return bool(reply)
