"""How a worker takes its next job: by priority, and batch work in turns by client.

RQ pops the first non-empty queue in order, first come first served. Interactive
and normal jobs keep that order; the batch tier (children of fan-outs and
low-priority jobs, the last queue) is served round robin across clients
(claim.lua), so a client whose fan-out arrives a second after another's wide one
is served alongside it instead of after it. Jobs stay in RQ's own queue list the
whole time, so rq-dashboard shows where each one waits.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job

from shared import keys
from shared.text import text

SCRIPT = resources.files("worker").joinpath("claim.lua").read_text()

IDLE_POLL_S = 1
"""An idle worker looks at the batch queue at least this often (a job requeued there wakes nobody)."""


class TurnTakingQueue(Queue):
    """RQ's Queue, with `dequeue_any` serving the last queue given in turns by client."""

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: Redis,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        queue_keys = [queue.key for queue in queues]
        claim = connection.register_script(SCRIPT)
        script_keys = [*queue_keys, keys.BATCH_OWNERS, keys.BATCH_RING]
        while True:
            reply = claim(keys=script_keys, args=[keys.batch_turns("")])
            if reply is None:
                if timeout is None:
                    return None
                # Block on the plain queues, and on the batch tier's wake-up list: its jobs must be
                # claimed through the script, never popped in arrival order.
                woke = connection.blpop([*queue_keys[:-1], keys.BATCH_WAKE], min(timeout, IDLE_POLL_S))
                if woke is None:
                    raise DequeueTimeout(timeout, queue_keys)
                if text(woke[0]) == keys.BATCH_WAKE:
                    continue
                reply = woke
            queue_key, job_id = text(reply[0]), text(reply[1])
            found = cls._fetch_dequeued_job(
                connection,
                queue_key,
                job_id,
                job_class=job_class,
                serializer=serializer,
                death_penalty_class=death_penalty_class,
            )
            if found is not None:
                return found
