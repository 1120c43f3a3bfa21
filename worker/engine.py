"""The engine: the one thread that runs MLX in a worker process.

RQ's main thread hands it submissions and waits on their handles. Keeping every
MLX call on one thread matters twice: mlx-lm's generation stream is thread-local,
and a later batching loop (mlx-lm's BatchGenerator) needs one owner of the model.
Nothing in the interface assumes one generation at a time.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx

from shared.errors import GenerationCanceled, GenerationFailed, InsufficientMemory, MlxqError
from shared.models import ModelSpec
from shared.schemas import GenerateRequest
from worker import generation
from worker.generation import Outcome, TextSink
from worker.model_cache import ModelCache, is_allocation_failure

logger = logging.getLogger(__name__)


@dataclass
class Submission:
    """One generation asked of the engine."""

    job_id: str
    request: GenerateRequest
    spec: ModelSpec
    max_tokens: int
    deadline: float = field(default=float("inf"))
    """time.monotonic() after which the generation is stopped between tokens."""
    on_text: TextSink | None = None


class Generation:
    """Handle on a submitted generation: wait for it, or cancel it from any thread."""

    def __init__(self, submission: Submission) -> None:
        self.submission = submission
        self.load_s = 0.0
        self._canceled = threading.Event()
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._error: BaseException | None = None

    @property
    def job_id(self) -> str:
        return self.submission.job_id

    def cancel(self) -> None:
        self._canceled.set()

    def stop_reason(self) -> str | None:
        if self._canceled.is_set():
            return "canceled"
        if time.monotonic() > self.submission.deadline:
            return "timeout"
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the generation ends or `timeout` passes; True when it has ended."""
        return self._done.wait(timeout)

    def result(self) -> Outcome:
        """The outcome of an ended generation; raises what the generation raised."""
        if not self._done.is_set():
            raise RuntimeError(f"generation {self.job_id} has not ended")
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    def _finish(self, outcome: Outcome | None, error: BaseException | None) -> None:
        self._outcome, self._error = outcome, error
        self._done.set()


@dataclass(frozen=True)
class Unload:
    """Asks the engine thread to unload a model (the admin endpoint's request)."""

    model: str


class Engine:
    """Owns the model cache and runs submissions on its own thread."""

    def __init__(self, cache: ModelCache, maintenance_interval_s: float = 1.0) -> None:
        self.cache = cache
        self.maintenance_interval_s = maintenance_interval_s
        self._inbox: queue.Queue[Generation | Unload | None] = queue.Queue()
        self.state = "idle"
        """idle, loading or generating: what the watchdog's probe tolerates differs."""
        self.progress_at = time.monotonic()
        """Last sign of life of the engine thread: a loop turn, a prefill chunk, a token."""
        self._active: dict[str, Generation] = {}
        self._lock = threading.Lock()
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

    def submit(self, submission: Submission) -> Generation:
        handle = Generation(submission)
        with self._lock:
            self._active[submission.job_id] = handle
        self._inbox.put(handle)
        return handle

    def request_unload(self, model: str) -> None:
        """Unload `model` once it is idle; MLX memory is only ever touched on the engine thread."""
        self._inbox.put(Unload(model))

    def cancel(self, job_id: str) -> bool:
        """Ask a submitted generation to stop; False when the engine does not hold it."""
        with self._lock:
            handle = self._active.get(job_id)
        if handle is None:
            return False
        handle.cancel()
        return True

    def active_job_ids(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # MLX's thread-local streams must be destroyed by the thread that made them, before
            # it ends; left to thread teardown they can abort the process ("terminate called
            # without an active exception"; ml-explore/mlx#4327).
            self.cache.unload_idle(keep=0, reason="engine stopping")
            mx.clear_streams()

    def _loop(self) -> None:
        while True:
            self.progress_at = time.monotonic()
            try:
                item = self._inbox.get(timeout=self.maintenance_interval_s)
            except queue.Empty:
                self._maintain()
                continue
            if item is None:
                return
            if isinstance(item, Unload):
                if not self.cache.unload(item.model, "asked to by an operator"):
                    logger.info("not unloading %s: it is not loaded or is serving", item.model)
                continue
            self._maintain()
            self._serve(item)

    def _maintain(self) -> None:
        try:
            self.cache.maintain()
        except Exception:
            logger.exception("model cache maintenance failed")

    def _serve(self, handle: Generation) -> None:
        outcome: Outcome | None = None
        error: BaseException | None = None
        try:
            outcome = self._execute(handle)
        except MlxqError as exc:
            error = exc
        except Exception as exc:
            if is_allocation_failure(exc):
                # The job fails, the process lives: free what can be freed and take the next job.
                self.cache.emergency_cleanup(f"allocation failed during job {handle.job_id}")
                error = InsufficientMemory(f"Memory ran out while generating: {exc}")
            else:
                logger.exception("generation failed", extra={"job_id": handle.job_id})
                error = GenerationFailed(f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._active.pop(handle.job_id, None)
        if error is not None:
            # The error crosses to another thread and may live on with the job; its traceback's
            # frames would keep the model (and its MLX memory) alive past any unload.
            error.__traceback__ = error.__context__ = error.__cause__ = None
        handle._finish(outcome, error)

    def _execute(self, handle: Generation) -> Outcome:
        sub = handle.submission
        if handle.stop_reason() == "canceled":
            raise GenerationCanceled("The job was canceled before it started")
        # KV headroom for the load decision; a token is rarely shorter than 3 characters.
        context = sub.max_tokens + math.ceil(sub.request.prompt_chars() / 3)
        self.state = "loading"
        try:
            loaded, handle.load_s = self.cache.acquire(sub.spec, context)
        finally:
            self.state = "idle"
        self.state = "generating"

        def between_tokens() -> str | None:
            self.progress_at = time.monotonic()
            return handle.stop_reason()

        try:
            return generation.generate(
                loaded.model,
                loaded.tokenizer,
                sub.request,
                max_tokens=sub.max_tokens,
                should_stop=between_tokens,
                on_text=sub.on_text,
                on_progress=self._touch,
            )
        finally:
            self.state = "idle"
            self.cache.release(sub.spec.name)

    def _touch(self, *_: object) -> None:
        self.progress_at = time.monotonic()
