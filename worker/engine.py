"""The engine: the one thread that runs MLX in a worker process, generating in batches.

RQ's side hands it submissions (one per job, from as many threads as the worker
holds jobs) and waits on their handles (worker/generation.py). Keeping every MLX
call on one thread matters twice: mlx-lm's generation stream is thread-local, and
continuous batching needs one owner of the model. Each turn of the loop takes
what arrived, lets the scheduler (worker/scheduler.py) decide who joins the batch,
and has the batch runner (worker/batch_runner.py) take one decode step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import mlx.core as mx

from shared.errors import GenerationFailed
from shared.models import ModelSpec
from worker.batch_runner import BatchRunner
from worker.embedding import EmbedWork
from worker.embedding_runs import Embeds
from worker.generation import Generation, Submission
from worker.kv_manager import KVCacheManager
from worker.model_cache import ModelCache
from worker.prefill_pace import PrefillPace
from worker.rows import Outcome
from worker.scheduler import Scheduler

logger = logging.getLogger(__name__)

GATHER_S = 0.03
"""How long an idle engine's first prefill waits at most for the jobs claimed with its job to be submitted:
they arrive a millisecond or so apart (each job's thread records its start in Redis and reads its request first),
and a prefill begun on the first would hold the rest back by its whole length. The wait ends as soon as the
last of them is submitted (or ends before submitting); the bound only guards against a slow one."""

READ_AHEAD_PROMPTS = 32
"""Prompts of a model loaded ahead of its requests whose kept prefixes are read back into memory (the most
recently used first), while memory has room."""


@dataclass(frozen=True)
class Wake:
    """Ends an engine's wait for claimed jobs: one of them ended before it was submitted."""


@dataclass(frozen=True)
class Unload:
    """Asks the engine thread to unload a model (the admin endpoint's request)."""

    model: str


@dataclass(frozen=True)
class Load:
    """Asks the engine thread to load a model before any request needs it (warm, or `mlxq load`)."""

    spec: ModelSpec


class Engine:
    """Runs submissions, batched, on its own thread: the scheduler decides, the runner executes."""

    def __init__(
        self,
        cache: ModelCache,
        kv: KVCacheManager,
        scheduler: Scheduler,
        maintenance_interval_s: float,
        pace: PrefillPace,
        prefill_batch_size: int,
    ) -> None:
        if scheduler.ledger is not cache.ledger:
            raise ValueError("the scheduler and the model cache must share one memory ledger")
        self.cache = cache
        self.scheduler = scheduler
        self.maintenance_interval_s = maintenance_interval_s
        self.runner = BatchRunner(
            cache,
            kv,
            scheduler,
            self._ended,
            pace,
            prefill_batch_size,
            self._alive_sign,
        )
        self._inbox: queue.Queue[Generation | EmbedWork | Unload | Load | Wake | None] = queue.Queue()
        self._expected: set[str] = set()
        """Jobs the worker has claimed for this engine and not yet submitted (`expect`)."""
        self.gather_s = GATHER_S
        self._warming: list[ModelSpec] = []
        """Models to load once no batch runs (a load would stall its streams)."""
        self._reading_ahead: list[tuple[str, list[int]]] = []
        """Prompts whose kept prefixes are read back from disk while nothing else runs, after a model's load
        ahead of its requests: a worker started again has its sessions' next turns in memory, as before."""
        self.state = "idle"
        """idle, loading or generating: what the watchdog's probe tolerates differs."""
        self.progress_at = time.monotonic()
        """Last sign of life of the engine thread: a loop turn, a prefill chunk, a token."""
        self._active: dict[str, Generation] = {}
        self._embedding: dict[str, EmbedWork] = {}
        self._embeds = Embeds(cache, self._alive_sign)
        self._lock = threading.Lock()
        self._maintained_at = 0.0
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever runs, finish the loop, and wait for the thread."""
        with self._lock:
            for handle in self._active.values():
                handle.cancel()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def batch_limit(self) -> int:
        return self.scheduler.batch_limit

    def expect(self, job_id: str) -> None:
        """A job was claimed for this engine (any thread): a prefill from idle waits for it (GATHER_S)."""
        self._expected.add(job_id)

    def unexpect(self, job_id: str) -> None:
        """The claimed job ended without being submitted (any thread): nothing waits for it any more."""
        if job_id in self._expected:
            self._expected.discard(job_id)
            self._inbox.put(Wake())

    def submit(self, submission: Submission) -> Generation:
        handle = Generation(submission)
        with self._lock:
            self._active[submission.job_id] = handle
        self._expected.discard(submission.job_id)
        self._inbox.put(handle)
        return handle

    def embed(self, work: EmbedWork) -> None:
        """Run an embedding job's batches between decode steps; `work` says when it is done."""
        with self._lock:
            self._embedding[work.job_id] = work
        self._expected.discard(work.job_id)
        self._inbox.put(work)

    def request_unload(self, model: str) -> None:
        """Unload `model` once it is idle; MLX memory is only ever touched on the engine thread."""
        self._inbox.put(Unload(model))

    def request_load(self, spec: ModelSpec) -> None:
        """Load `spec` once no batch runs, unless it is loaded already."""
        self._inbox.put(Load(spec))

    def cancel(self, job_id: str) -> bool:
        """Ask a submitted generation to stop; False when the engine does not hold it."""
        with self._lock:
            handle: Generation | EmbedWork | None = self._active.get(job_id) or self._embedding.get(job_id)
        if handle is None:
            return False
        handle.cancel()
        return True

    def generated(self, job_id: str) -> int:
        """Tokens the job's generation made so far in this process (any thread; 0 when not held)."""
        with self._lock:
            handle = self._active.get(job_id)
        return 0 if handle is None else handle.generated

    def active_job_ids(self) -> list[str]:
        """The jobs the engine holds, generations and embeddings alike: what a stop hands back and a cancel
        flag reaches."""
        with self._lock:
            return [*self._active, *self._embedding]

    def has_room(self, held: int) -> bool:
        """Whether a job claimed now could join soon (any thread)."""
        return self.room(held) > 0

    def room(self, held: int) -> int:
        """How many jobs claimed now could join soon (any thread)."""
        return self.scheduler.room(held, self._inbox.qsize())

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            stopped = GenerationFailed("The worker's engine stopped before the job ended")
            self.runner.end_everything(stopped)
            self._embeds.end_everything(stopped)
            # MLX's thread-local streams must be destroyed by the thread that made them, before
            # it ends; left to thread teardown they can abort the process ("terminate called
            # without an active exception"; ml-explore/mlx#4327).
            self.cache.unload_idle(keep=0, reason="engine stopping")
            mx.clear_streams()

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            self.progress_at = time.monotonic()
            idle = not scheduler.busy and not self._embeds.waiting
            arrived = self._arrivals(wait=idle and not self._reading_ahead)
            if idle and any(isinstance(item, (Generation, EmbedWork)) for item in arrived):
                arrived += self._gathered()
            for item in arrived:
                if isinstance(item, EmbedWork):
                    self._embeds.add(item)
                elif isinstance(item, Unload):
                    if not self.cache.unload(item.model, "asked to by an operator"):
                        logger.info("not unloading %s: it is not loaded or is serving", item.model)
                elif isinstance(item, Load):
                    self._warming.append(item.spec)
                elif isinstance(item, Generation):
                    self.runner.add(item)
            if None in arrived:
                return  # what was submitted ends as failed (_run)
            # On the clock, busy or idle (an idle wait ends by it): not before every new batch, where a
            # look at the system's memory would delay the first token of every short request.
            if time.monotonic() - self._maintained_at >= self.maintenance_interval_s:
                self._maintain()
            try:
                self._turn()
            except Exception as exc:
                # Whatever a model or its cache does, the batch's jobs fail with it and the engine
                # serves the rest: a dead engine would take every model down until a restart.
                logger.exception("an engine turn failed; its batch's jobs fail, the engine goes on")
                scheduler.update_from_output(self.runner.fail_running(exc))
            # One batch of vectors between decode steps, taking no longer than a piece of prefill beside them.
            decoding = scheduler.batch is not None and bool(scheduler.batch.members)
            waiting = self._embeds.waiting
            for ended in self._embeds.piece(self.runner.pace.other_work_s() if decoding else None):
                with self._lock:
                    self._embedding.pop(ended, None)
            if decoding and waiting:
                self.runner.pace.beside_batch()
            if scheduler.batch is None and self._warming:
                self._warm(self._warming.pop(0))
            elif idle and not arrived and self._reading_ahead:
                self._read_ahead(*self._reading_ahead.pop(0))
            self.state = "generating" if scheduler.batch is not None else "idle"

    def _turn(self) -> None:
        """The scheduler decides, the runner carries it out (a ticket to prepare first is decided on once
        prepared), and the batch takes one step."""
        scheduler = self.scheduler
        while True:
            decided = scheduler.schedule()
            scheduler.update_from_output(self.runner.execute(decided))
            if not decided.prepare:
                break
        if scheduler.batch is not None and scheduler.batch.members:
            self.state = "generating"
            scheduler.update_from_output(self.runner.step())

    def _warm(self, spec: ModelSpec) -> None:
        if spec.name in self.cache.loaded_names():
            return
        self._alive_sign("loading")
        try:
            loaded, _ = self.cache.acquire(spec, 0)
            self.cache.release(spec.name)
            logger.info("loaded model %s ahead of its requests", spec.name)
            if loaded.kind == "generate":
                kv = self.runner.kv
                kv.serving(spec.name, loaded.model, loaded.identity, loaded.caches.cuttable)
                prompts = kv.recent_prompts(spec.name, READ_AHEAD_PROMPTS)
                self._reading_ahead += [(spec.name, prompt) for prompt in prompts]
        except Exception as exc:
            logger.warning("could not load model %s ahead of its requests: %s", spec.name, exc)
        finally:
            self._alive_sign("idle")

    def _read_ahead(self, model: str, prompt: list[int]) -> None:
        if model not in self.cache.loaded_names():
            return  # unloaded meanwhile: its prefixes wait on disk for a request
        kv = self.runner.kv
        if not kv.room_to_read_ahead:
            self._reading_ahead.clear()
            return
        try:
            kv.read_ahead(model, prompt)
        except Exception as exc:
            logger.warning("could not read a kept prefix of %s back from disk: %s", model, exc)
        self._alive_sign(None)

    def _gathered(self) -> list[Generation | EmbedWork | Unload | Load | Wake | None]:
        """What arrives until every job claimed by now is submitted (GATHER_S at most): jobs claimed
        together are prefilled together."""
        arrived: list[Generation | EmbedWork | Unload | Load | Wake | None] = []
        deadline = time.monotonic() + self.gather_s
        # Only those claimed already: under a steady flow of claims there is always one more on its way.
        claimed = set(self._expected)
        while (
            not claimed.isdisjoint(self._expected) and None not in arrived and (left := deadline - time.monotonic()) > 0
        ):
            try:
                arrived.append(self._inbox.get(timeout=left))
            except queue.Empty:
                break
        return arrived

    def _arrivals(self, wait: bool) -> list[Generation | EmbedWork | Unload | Load | Wake | None]:
        """Everything in the inbox; when idle, wait up to the maintenance interval for something."""
        arrived: list[Generation | EmbedWork | Unload | Load | Wake | None] = []
        try:
            if wait:
                arrived.append(self._inbox.get(timeout=self.maintenance_interval_s))
            while True:
                arrived.append(self._inbox.get_nowait())
        except queue.Empty:
            return arrived

    def _maintain(self) -> None:
        self._maintained_at = time.monotonic()
        try:
            self.cache.maintain()  # kept prefixes go first, then idle models, by the thresholds
            self.scheduler.limit_batch(self.cache.probe())
        except Exception:
            logger.exception("model cache maintenance failed")

    def _alive_sign(self, state: str | None) -> None:
        if state is not None:
            self.state = state
        self.progress_at = time.monotonic()

    def _ended(self, handle: Generation, outcome: Outcome | None, error: BaseException | None) -> None:
        with self._lock:
            self._active.pop(handle.job_id, None)
        handle.end(outcome, error)
