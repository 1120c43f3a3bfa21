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
import logging
from importlib import resources
from typing import Any, Literal

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job
from rq.utils import now, utcformat

from shared import job_stream, keys
from shared.outage import UNREACHABLE
from shared.text import text

logger = logging.getLogger(__name__)

SCRIPT = resources.files("shared").joinpath("batch_progress.lua").read_text()


def job_ended(redis: Redis, job: Job, status: str, ttl_s: int, **data: Any) -> None:
    """Write the end of the job's stream (finished, failed or canceled) and, for a batch child,
    record it in its batch."""
    job_stream.end(redis, job.id, status, ttl_s, **data)
    child_ended(redis, job, status, ttl_s, **data)


def child_ended(redis: Redis, job: Job, status: str, ttl_s: int, **data: Any) -> None:
    """`job_ended` for a job whose stream's end is written: record it in its batch, if it is a batch's child."""
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


State = Literal["open", "done", "gone"]
"""A batch with children still running, one whose children have all ended, or none at all."""


def sweep(redis: Redis, batch_id: str, ttl_s: int) -> State:
    """Record every child that has ended by RQ's status."""
    return _run(redis, batch_id, "", "", ttl_s)


def sweep_open(redis: Redis, ttl_s: int) -> int:
    """Sweep every open batch; how many were found complete. A batch that cannot be swept (a broken
    record) is logged and left for the next sweep; the others go on."""
    done = 0
    for batch_id in [text(member) for member in redis.smembers(keys.OPEN_BATCHES)]:
        try:
            done += sweep(redis, batch_id, ttl_s) == "done"
        except UNREACHABLE:
            raise
        except RedisError as exc:
            logger.warning("could not sweep batch %s: %s", batch_id, type(exc).__name__)
    return done


def _run(redis: Redis, batch_id: str, custom_id: str, event: str, ttl_s: int) -> State:
    script = redis.register_script(SCRIPT)
    reply = script(
        keys=[
            keys.batch(batch_id),
            keys.batch_ended(batch_id),
            keys.batch_stream(batch_id),
            Queue.redis_queues_keys,
            keys.OPEN_BATCHES,
            keys.WAKE,
            keys.STREAMS_WRITTEN,
        ],
        args=[
            custom_id,
            event,
            utcformat(now()),
            ttl_s,
            Job.redis_job_namespace_prefix,
            batch_id,
            keys.BATCH_KEPT_S,
            keys.WAKE_MAX,
            keys.STREAMS_WRITTEN_MAXLEN,
        ],
    )
    state: State = text(reply)  # type: ignore[assignment]
    return state
