"""mlxq's RQ worker: jobs run in this process, next to the loaded model, several at once.

A `SimpleWorker` (no fork per job) because a forked work-horse would lose the
loaded model and Metal is unsafe after fork. What SimpleWorker lacks is added
here: up to `MLXQ_MAX_BATCH` jobs held at once (RQ's main thread claims a job
while the batch has room, starts its execution and hands it to a thread of its
own (kept between jobs) that submits it to the engine, runs RQ's per-job steps and ends it; each is
a proper RQ job with its execution, heartbeats and registries), a heartbeat key
of our own refreshed by a thread, cancel flags honoured between tokens, and
RQ's stop-job command routed to the engine. How each job's end is recorded in RQ is
its base's (worker/rq_endings.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from redis.client import Pipeline
from rq import Queue
from rq.exceptions import DequeueTimeout, NoSuchJobError, StopRequested
from rq.job import Job, JobStatus
from rq.timeouts import BaseDeathPenalty
from rq.worker import WorkerStatus

from shared import keys
from shared.json_bytes import JobSerializer
from shared.outage import quietly, until_redis
from shared.settings import Settings
from shared.text import text
from worker.affinity import ModelAffinity
from worker.claiming import IDLE_POLL_S, TurnTakingQueue
from worker.endings import JobEndings
from worker.engine import Engine
from worker.monitor import Monitor
from worker.reports import Reports
from worker.rq_endings import EndRecordingWorker
from worker.stream_starts import StreamStarts
from worker.streaming import StreamPublisher
from worker.supervision.crash_suspect import CrashSuspect
from worker.supervision.orphans import reclaim_claimed

logger = logging.getLogger(__name__)

JOB_THREADS = 1024
"""Threads that run jobs at most: far above any batch (the engine's room bounds the jobs held at once)."""


class NoDeathPenalty(BaseDeathPenalty):
    """RQ's SIGALRM timeout cannot reach a job's thread (nor a native MLX call); the engine stops a
    generation at its deadline between tokens instead."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class MlxqWorker(EndRecordingWorker):
    """An RQ worker whose jobs are generations on this process's engine, run in batches."""

    death_penalty_class = NoDeathPenalty

    def __init__(
        self, queues: Sequence[Queue], *, settings: Settings, engine: Engine, publisher: StreamPublisher, **kwargs: Any
    ) -> None:
        # A job enqueued around the gateway gets RQ's default description, which quotes
        # its arguments (the prompt); RQ must not log it.
        super().__init__(
            queues, serializer=JobSerializer, log_job_description=False, queue_class=TurnTakingQueue, **kwargs
        )
        # After RQ checked the queues' class: claims go to this worker's claimed list.
        self.claims = TurnTakingQueue.for_worker(self.name)
        self.queue_class = self.claims
        self.affinity = ModelAffinity(self.connection, self.name, settings.swap_after_s)
        self.queue_class.preference = lambda: replace(
            self.affinity.preference(bool(self._running)), room=self._claimable()
        )
        self.queue_class.prefix_wait_s = settings.prefix_wait_s
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.endings = JobEndings(self.connection, self.name, publisher, settings.stream_ttl_s)
        self.reports = Reports(self.connection, self.name, settings.drain_window_s)
        self._handed_back = set()
        self.stream_starts = StreamStarts(settings.stream_ttl_s)
        self._running: dict[str, Any] = {}
        """Job id -> its RQ execution (None until its thread has started it), while a thread of `_threads`
        runs it."""
        self._threads = ThreadPoolExecutor(max_workers=JOB_THREADS, thread_name_prefix="job")
        """Kept between jobs: starting a thread waits for it to take the GIL from the engine's, a few ms a claim."""
        self._performing: set[Future[None]] = set()
        self._start_failed: Exception | None = None
        """What a job's thread could not start it with, raised on RQ's loop (which then ends the worker)."""
        self._room = threading.Event()
        """Set when a job ends: the main thread may claim another."""
        self.suspect = CrashSuspect(self.connection, self.name, engine.generated)
        self._canceled = set()
        self.monitor = Monitor(
            self.connection,
            self.name,
            settings,
            engine,
            self._canceled,
            running=lambda: list(self._running),
            registered=self._registered,
        )

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        self.monitor.beat()
        self.monitor.start()

    def _registered(self) -> None:
        """RQ's record of this worker, written again if Redis lost it (it came back empty, or another
        instance took over): without it the worker is listed nowhere while it runs jobs."""
        if self.connection.sismember(self.redis_workers_keys, self.key):
            return
        logger.warning("Redis had lost this worker's registration (it came back empty?); registering again")
        # RQ's own heartbeat may have written a partial record since: birth refuses a record it finds.
        self.connection.delete(self.key)
        self.register_birth()  # type: ignore[no-untyped-call]
        self._state = ""  # the new record has none yet
        self.set_state(WorkerStatus.BUSY if self._running else WorkerStatus.IDLE)

    def teardown(self) -> None:
        # Whatever ends the loop (a stop request, an error it could not survive), the jobs still
        # running go back to the front of their queues rather than fail.
        self._hand_back_running()
        deadline = time.monotonic() + self.settings.stop_grace_s
        futures.wait(list(self._performing), timeout=max(0.0, deadline - time.monotonic()))
        self._threads.shutdown(wait=False)
        self.monitor.stop()
        super().teardown()  # type: ignore[no-untyped-call]
        # A stop that came between a claim and the job's start: the job goes back first in line.
        reclaim_claimed(self.connection, self.name, self.settings.stream_ttl_s)
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.delete(keys.worker_heartbeat(self.name))
            pipe.delete(keys.worker_prefixes(self.name))
            pipe.srem(keys.CLAIMING_WORKERS, self.name)
            pipe.delete(keys.worker_suspect(self.name))
            pipe.hdel(keys.WORKER_MODELS, self.name)
            pipe.execute()
        self.reports.withdraw()

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Hand the job to a thread of its own, which starts and runs it; return at once, so that RQ's
        loop claims the next job meanwhile. Started here, each start (RQ's execution record, a round
        trip) held the next one back: eight jobs claimed together reached the engine one by one, 20 ms
        from the first to the last, and were prefilled in as many pieces. Each of RQ's bookkeeping steps
        waits out a Redis outage: a job claimed before or finished during one is recorded once Redis is
        back, never lost (until started, it is in this worker's claimed list)."""
        self._running[job.id] = None  # counted against the batch's room from now
        self.engine.expect(job.id)  # jobs claimed together are prefilled together
        # RQ's signal handler raises StopRequested wherever this thread is unless the worker is busy: busy from
        # here (the start's transaction records it), a stop waits for the loop, and cannot land between the
        # thread's start and its tracking below (teardown would put the job back while the thread ran it).
        self._state = WorkerStatus.BUSY
        performing = self._threads.submit(self._perform, job, queue)
        self._performing.add(performing)
        performing.add_done_callback(self._performing.discard)
        self.monitor.poke()  # /health lists the job now, not a beat later

    def _perform(self, job: Job, queue: Queue) -> None:
        tries = 0

        def prepare() -> Any:
            nonlocal tries
            tries += 1
            return self.start_execution(job)

        retried = False
        try:
            try:
                execution = until_redis("starting a job", prepare)
            except Exception as exc:
                # Not an outage (until_redis waits those out): the worker ends as it did when starts were made
                # on RQ's loop, whose teardown puts the claimed job back first in line; the watchdog starts
                # another worker.
                logger.exception("starting a job failed; the worker stops", extra={"job_id": job.id})
                self._start_failed = exc
                return
            retried = tries > 1
            self._running[job.id] = execution
            self.perform_job(job, queue, execution)
        finally:
            if retried:
                # An execution retried across a Redis outage may have been recorded twice; the one RQ
                # did not end must not stay in the started registry as if the job still ran.
                quietly("cleaning the started registry", lambda: self._drop_stale_executions(job, queue))
            self.engine.unexpect(job.id)  # if it ended before reaching the engine
            self.stream_starts.take(job.id)  # if its task never took it
            self._running.pop(job.id, None)
            self.suspect.clear(job.id)
            if not self._running:
                quietly("going idle", lambda: self.set_state(WorkerStatus.IDLE))
            if job.get_status(refresh=False) != JobStatus.FINISHED:  # a finished one's end counted it
                # A cancel, a failure or a hand-back: over at once, its time says nothing of what a job takes.
                batch = self.engine.batch_limit
                quietly("recording a job's end", lambda: self.reports.job_ended(job.id, None, batch))
            self.monitor.poke()  # the job is no longer listed
            self._room.set()

    def _unstarted_claim(self) -> tuple[Job, Queue] | None:
        """A job in this worker's claimed list that it is not running: its claim's answer was lost
        (Redis went away between the claim and the job's fetch). It is this worker's to start. Looked for
        only while an answer may have been lost: otherwise a round trip in the way of every claim."""
        if not self.claims.answer_lost:
            return None
        claimed = keys.worker_claimed(self.name)
        ahead = {job.id for job, _ in self.claims.ahead}
        for job_id in [text(member) for member in self.connection.lrange(claimed, 0, -1)]:
            if job_id in self._running or job_id in ahead:
                continue
            try:
                job = Job.fetch(job_id, connection=self.connection, serializer=JobSerializer)
            except NoSuchJobError:
                self.connection.lrem(claimed, 1, job_id)
                continue
            if job.get_status() != "queued":
                self.connection.lrem(claimed, 1, job_id)
                continue
            logger.info("starting a job whose claim was interrupted", extra={"job_id": job_id})
            return job, self.queue_class(job.origin, connection=self.connection, serializer=JobSerializer)
        self.claims.answer_lost = False  # each one looked at: none left to start
        return None

    def _drop_stale_executions(self, job: Job, queue: Queue) -> None:
        registry = queue.started_job_registry.key
        members = [text(m) for m in self.connection.zrange(registry, 0, -1)]
        stale = [m for m in members if m.startswith(job.id + ":")]
        if stale:
            self.connection.zrem(registry, *stale)

    def starting(self, job: Job, pipe: Pipeline) -> None:
        self.stream_starts.writes(job, pipe)

    def started(self, job: Job, replies: list[Any]) -> None:
        self.stream_starts.answered(job, replies)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # RQ goes idle between claims; the worker is busy while any of its jobs runs.
        if state == WorkerStatus.IDLE and self._running:
            state = WorkerStatus.BUSY
        if pipeline is None and state == self._state:
            return  # RQ sets it around every claim: a round trip each, in the way of the next claim
        super().set_state(state, pipeline)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """The next job, claimed only while the batch has room; a stop request ends the wait."""
        quietly("going idle", lambda: self.set_state(WorkerStatus.IDLE))
        while True:
            if self._start_failed is not None:
                raise self._start_failed
            if self._stop_requested:
                raise StopRequested()
            if self.suspect.holds_claims() or not self.engine.has_room(len(self._running)):
                self._wait_for_room()
                continue
            self.heartbeat()
            leftover = quietly("looking at claimed jobs", self._unstarted_claim)
            if isinstance(leftover, tuple):
                self.affinity.claimed(leftover[0])
                return self.suspect.claimed(leftover, alone=not self._running)
            try:
                found = self.queue_class.dequeue_any(
                    self._ordered_queues,
                    IDLE_POLL_S,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                continue
            if found is not None:
                self.log.info("Worker %s: %s: %s", self.name, found[1].name, found[0].id)
                self.affinity.claimed(found[0])
                return self.suspect.claimed(found, alone=not self._running)

    def _claimable(self) -> int:
        """How many jobs a claim may take: the batch's room, one while a crash suspect runs (it holds the
        claims back until it has shown it does not kill the worker)."""
        return 1 if self.suspect.present else self.engine.room(len(self._running))

    def _wait_for_room(self) -> None:
        self._room.wait(0.1 if self.suspect.present else IDLE_POLL_S)
        self._room.clear()

    def request_stop(self, signum: Any, frame: Any) -> None:
        """SIGTERM/SIGINT: stop taking jobs, and hand back what runs instead of finishing it.

        A long generation would outlast the watchdog's grace period; stopping it between
        tokens and putting the job back at the front of its queue loses nothing.
        """
        self._hand_back_running()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def _hand_back_running(self) -> None:
        for job_id in self.engine.active_job_ids():
            self._handed_back.add(job_id)
            self.engine.cancel(job_id)

    def kill_horse(self, sig: Any = None) -> None:
        """RQ's stop-job command ends here; with no horse to kill, stop the generation instead."""
        job_id = self._stopped_job_id
        if job_id and self.engine.cancel(job_id):
            self._canceled.add(job_id)

    def keep_alive(self, job: Job) -> None:
        """Refresh RQ's own heartbeats for a running job (SimpleWorker writes them once per job)."""
        execution = self._running.get(job.id)
        if execution is not None:
            quietly("refreshing a job's heartbeat", lambda: self.maintain_heartbeats(job, execution))
