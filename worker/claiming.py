"""How a worker takes its next job: by priority, the model it runs first, and batch work in turns by client.

RQ pops the first non-empty queue in order, first come first served. Interactive
and normal jobs keep that order; the batch tier (children of fan-outs and
low-priority jobs, the last queue) is served round robin across clients
(claim.lua), so a client whose fan-out arrives a second after another's wide one
is served alongside it instead of after it. Within a queue, a busy worker takes
jobs for the model it runs first; a job for another model waits at most
`MLXQ_SWAP_AFTER_S` (and one swap per that long), so two models alternating under
load do not make a worker drain and reload between every job (claim.lua). Jobs
stay in RQ's own queue list the whole time, so rq-dashboard shows where each one
waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, ClassVar

from redis import Redis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job

from shared import keys
from shared.outage import REDIS, RETRY_MAX_S, UNREACHABLE, until_redis
from shared.text import text

SCRIPT = resources.files("worker").joinpath("claim.lua").read_text()

IDLE_POLL_S = 1
"""An idle worker looks at the queues at least this often (a job requeued or released wakes nobody)."""

PASSED_OVER_POLL_S = 0.1
"""A busy worker that passed over another model's jobs looks again this soon: its batch may drain
(or the jobs become overdue) any moment, and nothing else wakes it then."""

SCAN = 64
"""Jobs of one queue a claim looks at for one of the worker's model."""


@dataclass(frozen=True)
class Preference:
    """What a worker tells the claim script about itself."""

    model: str = ""
    """The model it runs (of the last job it claimed); "" before its first."""
    room: int = 1
    """How many jobs it may claim now (its batch's room): jobs that arrive together start together."""
    busy: bool = False
    may_swap: bool = True
    """Its last swap is at least `swap_after_s` old."""
    swap_after_s: float = 0.0

    def argv(self) -> list[str | float]:
        return [self.model, "1" if self.busy else "0", "1" if self.may_swap else "0", self.swap_after_s]


class TurnTakingQueue(Queue):
    """RQ's Queue, with `dequeue_any` serving the last queue given in turns by client, and recording
    each claim in the worker's claimed list (claim.lua)."""

    worker_name: ClassVar[str | None] = None
    """Set on the class a worker claims with (`for_worker`): whose claimed list a claim goes to."""
    preference: ClassVar[Callable[[], Preference]] = Preference
    """Set by the worker: its model and whether it may swap, read at each claim."""
    prefix_wait_s: ClassVar[float] = 0.0
    """Set by the worker (MLXQ_PREFIX_WAIT_S): how long a job waits for the worker holding its prompt's start."""
    answer_lost: ClassVar[bool] = True
    """Whether a claim's answer may have been lost (Redis went away while it ran, or the worker has just
    started): the worker then looks in its claimed list for a job it holds but never started."""
    clock: ClassVar[Callable[[], float]] = time.time
    """Now, in seconds since the epoch, as each claim tells the script (a test's own clock steps past a
    swap window without sleeping through it)."""

    ahead: ClassVar[list[tuple[Job, Queue]]] = []
    """Jobs claimed with an earlier one and not handed out yet (a class's own: `for_worker`). They are in
    the worker's claimed list: a crash or a stop puts them back in line as it does any claimed job."""

    @classmethod
    def for_worker(cls, worker_name: str) -> type[TurnTakingQueue]:
        """The class `worker_name` claims jobs with."""
        return type(cls.__name__, (cls,), {"worker_name": worker_name, "ahead": []})

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
        if cls.worker_name is None:
            raise RuntimeError("claim with TurnTakingQueue.for_worker(name): a claim must name its worker")
        if cls.ahead:
            return cls.ahead.pop(0)
        queue_keys = [queue.key for queue in queues]
        claim = connection.register_script(SCRIPT)
        script_keys = [
            *queue_keys,
            keys.BATCH_OWNERS,
            keys.BATCH_RING,
            keys.worker_claimed(cls.worker_name),
            keys.CLAIMING_WORKERS,
            keys.WORKER_MODELS,
        ]
        job_prefix = (job_class or Job).redis_job_namespace_prefix
        while True:
            try:
                preference = cls.preference()
                args = [
                    keys.batch_turns(""),
                    cls.worker_name,
                    *preference.argv(),
                    cls.clock(),
                    job_prefix,
                    *keys.HEARTBEAT_AFFIXES,
                    SCAN,
                    keys.PULLING,
                    *keys.PREFIXES_AFFIXES,
                    cls.prefix_wait_s,
                    keys.WAKE,
                    max(1, preference.room),
                ]
                reply = claim(keys=script_keys, args=args)
                if reply == b"wait":
                    time.sleep(PASSED_OVER_POLL_S)
                    if timeout is None:
                        return None
                    raise DequeueTimeout(timeout, queue_keys)
                if reply is None:
                    if timeout is None:
                        return None
                    # Every claim goes through the script (turns, the claimed list), never a plain pop:
                    # block on the wake-up list that admission pushes to, and look again.
                    if connection.blpop([keys.WAKE], min(timeout, IDLE_POLL_S)) is None:
                        raise DequeueTimeout(timeout, queue_keys)
                    continue
            except UNREACHABLE as exc:
                # Not RQ's own retry: it logs every attempt and backs off to a minute, long after Redis is back.
                REDIS.failed("waiting for jobs", exc)
                cls.answer_lost = True
                time.sleep(RETRY_MAX_S)
                if timeout is None:
                    return None
                raise DequeueTimeout(timeout, queue_keys) from None
            REDIS.ok()
            claims = [(text(reply[i]), text(reply[i + 1]), reply[i + 2]) for i in range(0, len(reply), 3)]
            cls.ahead.extend(cls._claimed_jobs(connection, claims, job_class, serializer, death_penalty_class))
            if cls.ahead:
                return cls.ahead.pop(0)

    @classmethod
    def _claimed_jobs(
        cls,
        connection: Redis,
        claims: list[tuple[str, str, list[Any]]],
        job_class: type[Job] | None,
        serializer: Any,
        death_penalty_class: Any,
    ) -> list[tuple[Job, Queue]]:
        """The claimed jobs (queue key, job id, its hash as the claim read it, flat), as RQ's fetch makes
        them; a job whose hash is gone is left out, as RQ's own fetch leaves it, and leaves the claimed list
        (waiting out an outage: the job is this worker's now)."""
        job_cls = job_class or Job
        found = []
        for queue_key, job_id, fields in claims:
            if not fields:
                claimed = keys.worker_claimed(str(cls.worker_name))
                until_redis("dropping a claimed job that is gone", partial(connection.lrem, claimed, 1, job_id))
            else:
                job = job_cls(job_id, connection=connection, serializer=serializer)
                job.restore(dict(zip(fields[::2], fields[1::2], strict=True)))
                queue = cls.from_queue_key(
                    queue_key,
                    connection=connection,
                    job_class=job_cls,
                    serializer=serializer,
                    death_penalty_class=death_penalty_class,
                )
                found.append((job, queue))
        return found
