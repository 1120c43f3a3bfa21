"""The engine: the one thread that runs MLX in a worker process, generating in batches.

RQ's side hands it submissions (one per job, from as many threads as the worker
holds jobs) and waits on their handles. Keeping every MLX call on one thread
matters twice: mlx-lm's generation stream is thread-local, and continuous
batching needs one owner of the model. Up to `max_batch` submissions for the
loaded model run together in one mlx-lm BatchGenerator: a new one joins between
decode steps, one that ends (its length, a stop, a cancel, its deadline) leaves,
and the others go on. Everything per request (sampler, stops, text) is its own
(worker/rows.py). A submission for another model waits until the batch drains.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from shared.errors import (
    ExceedsMemoryBudget,
    GenerationCanceled,
    GenerationFailed,
    InsufficientMemory,
    JobTimedOut,
    MlxqError,
)
from shared.models import ModelSpec
from shared.schemas import GenerateRequest
from shared.sizing import format_bytes
from worker.model_cache import LoadedModel, ModelCache, is_allocation_failure
from worker.prefixes import MIN_SHARED_TOKENS, Prefixes, shareable, shared_length
from worker.rows import Outcome, Row, TextSink

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


@dataclass
class _Member:
    """A submission in the running batch."""

    handle: Generation
    row: Row
    context: int = 0
    """Prompt plus max_tokens: the KV cache positions it may fill."""
    prefilled: bool = False
    """Its whole prompt is in its KV cache (it has produced a token)."""
    generated: list[int] = field(default_factory=list)


@dataclass
class _Prepared:
    """A waiting submission whose model is acquired and prompt encoded."""

    loaded: LoadedModel
    row: Row
    sharer: tuple[int, int] | None = None
    """(uid, tokens): the batch member whose prompt starts like this one's, and how many tokens."""


@dataclass
class _Batch:
    """The running BatchGenerator, the model it runs, and its members by BatchGenerator uid."""

    model: str
    generator: Any
    shareable: bool = False
    """Its model's KV caches can be cut at any token (plain KVCache layers), so prefixes are reused."""
    members: dict[int, _Member] = field(default_factory=dict)


class Engine:
    """Owns the model cache and runs submissions, batched, on its own thread."""

    def __init__(
        self,
        cache: ModelCache,
        maintenance_interval_s: float = 1.0,
        max_batch: int = 16,
        prefill_step_size: int = 256,
        prefill_batch_size: int = 1,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.cache = cache
        self.maintenance_interval_s = maintenance_interval_s
        self.max_batch = max_batch
        # Prompt chunks between decode steps: a long prompt stalls the running rows one chunk at a time.
        self.prefill_step_size = prefill_step_size
        self.prefill_batch_size = prefill_batch_size
        self.prefixes = Prefixes(prefix_cache_bytes)
        cache.kept_bytes = lambda: self.prefixes.nbytes
        cache.drop_kept = self.prefixes.shrink_to
        cache.on_unload = lambda _model: self.prefixes.clear()  # their KV is no use without the model
        self.batch_limit = max_batch
        """max_batch, lowered while system memory is past its warning threshold."""
        self._memory_pressed = False
        self._waiting_for_room = False
        self._prepared: dict[str, _Prepared] = {}
        self._inbox: queue.Queue[Generation | Unload | None] = queue.Queue()
        self.state = "idle"
        """idle, loading or generating: what the watchdog's probe tolerates differs."""
        self.progress_at = time.monotonic()
        """Last sign of life of the engine thread: a loop turn, a prefill chunk, a token."""
        self._active: dict[str, Generation] = {}
        self._lock = threading.Lock()
        self._waiting: deque[Generation] = deque()
        self._batch: _Batch | None = None
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
            self._end_everything(GenerationFailed("The worker's engine stopped before the job ended"))
            # MLX's thread-local streams must be destroyed by the thread that made them, before
            # it ends; left to thread teardown they can abort the process ("terminate called
            # without an active exception"; ml-explore/mlx#4327).
            self.cache.unload_idle(keep=0, reason="engine stopping")
            mx.clear_streams()

    def _loop(self) -> None:
        while True:
            self.progress_at = time.monotonic()
            busy = bool(self._waiting) or bool(self._batch and self._batch.members)
            arrived = self._arrivals(wait=not busy)
            for item in arrived:
                if item is None:
                    continue
                if isinstance(item, Unload):
                    if not self.cache.unload(item.model, "asked to by an operator"):
                        logger.info("not unloading %s: it is not loaded or is serving", item.model)
                else:
                    self._waiting.append(item)
            if None in arrived:
                return  # what was submitted ends as canceled (_run)
            members = self._batch.members if self._batch else {}
            if not members or time.monotonic() - self._maintained_at >= self.maintenance_interval_s:
                self._maintain()
            self._admit()
            if self._batch is not None and self._batch.members:
                self.state = "generating"
                self._step()
            elif self._batch is not None:
                self._close_batch()
            self.state = "generating" if self._batch is not None else "idle"

    def _arrivals(self, wait: bool) -> list[Generation | Unload | None]:
        """Everything in the inbox; when idle, wait up to the maintenance interval for something."""
        arrived: list[Generation | Unload | None] = []
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
            self._limit_batch(self.cache.probe())
        except Exception:
            logger.exception("model cache maintenance failed")

    def _limit_batch(self, used_percent: float) -> None:
        """Past the warning threshold the batch takes no one new; past the critical one it shrinks to
        half as its rows end. Rows are never cut short: memory is given back as they finish."""
        settings = self.cache.settings
        running = len(self._batch.members) if self._batch is not None else 0
        self._memory_pressed = used_percent >= settings.memory_warning_percent
        if used_percent >= settings.memory_critical_percent:
            limit = max(1, running // 2)
        elif self._memory_pressed:
            limit = max(1, min(running, self.batch_limit))
        else:
            limit = self.max_batch
        if limit != self.batch_limit:
            logger.info("batch limit %d -> %d: system memory at %.1f %%", self.batch_limit, limit, used_percent)
            self.batch_limit = limit

    # -- joining the batch ----------------------------------------------------------------

    def _admit(self) -> None:
        """Move waiting submissions into the batch while it has room and runs their model. One that
        waits for a member to finish computing the prefix it shares keeps its place in line and
        lets the others by; one that waits for KV room stops the line (first come, first served,
        so a long context is not starved by short ones), and the worker claims nothing meanwhile."""
        self._expire_waiting()
        held: list[Generation] = []
        self._waiting_for_room = False
        while self._waiting:
            handle = self._waiting[0]
            if handle.stop_reason() == "canceled":
                self._waiting.popleft()
                self._unprepare(handle)
                self._finish(handle, None, GenerationCanceled("The job was canceled before it started"))
                continue
            spec = handle.submission.spec
            if self._batch is not None and self._batch.model != spec.name:
                if self._batch.members:
                    break  # another model: it waits until this batch drains
                self._close_batch()
            if self._batch is not None and len(self._batch.members) >= self.batch_limit:
                break
            self._waiting.popleft()
            joined = self._join(handle)
            if joined == "prefix":
                held.append(handle)
            elif joined == "room":
                self._waiting.appendleft(handle)
                self._waiting_for_room = True
                break
        self._waiting.extendleft(reversed(held))

    def _expire_waiting(self) -> None:
        """A submission past its deadline ends while it waits, as it would while it runs."""
        for handle in [h for h in self._waiting if h.stop_reason() == "timeout"]:
            self._waiting.remove(handle)
            self._unprepare(handle)
            self._finish(handle, None, JobTimedOut("The job passed its deadline before it could start"))

    def _join(self, handle: Generation) -> str:
        """Start the submission in the batch, or end it with its error ("joined"); "prefix" while it
        waits for a member computing the prefix it shares, "room" while the KV cache has none."""
        prepared = self._prepared.get(handle.job_id) or self._prepare(handle)
        if prepared is None:
            return "joined"
        sub, row = handle.submission, prepared.row
        context = len(row.prompt_ids) + sub.max_tokens
        try:
            batch = self._batch or self._open_batch(sub.spec.name, prepared.loaded)
            if not self._kv_room(batch, prepared.loaded, context):
                return "room"
            start = self._prefix_for(batch, prepared)
            if start is None:
                return "prefix"
            cache, reused = start
            ids = row.prompt_ids
            [uid] = batch.generator.insert(
                [ids[reused:]],
                max_tokens=[sub.max_tokens],
                caches=[cache],
                all_tokens=[ids[:reused]],
                **row.batch_options(),
            )
        except Exception as exc:
            self._unprepare(handle)
            self._finish(handle, None, self._translated(exc, handle.job_id))
            return "joined"
        del self._prepared[handle.job_id]
        row.cached_tokens = reused
        batch.members[uid] = _Member(handle, row, context)
        self._count_kv()
        return "joined"

    def _kv_room(self, batch: _Batch, loaded: LoadedModel, context: int) -> bool:
        """Whether the batch's KV cache fits the budget with one more row of `context` positions
        (kept prefixes and idle models make way); False to wait for a member to leave. Rows are
        padded to the longest, so the batch holds rows x the longest context. A context that
        cannot fit even alone fails at once; one that cannot fit an empty batch, for now."""
        per_token = loaded.kv_bytes_per_token
        alone = loaded.size_bytes + per_token * context
        if alone > self.cache.budget_bytes:
            raise ExceedsMemoryBudget(
                f"{context} tokens of context (prompt + max_tokens) need {format_bytes(per_token * context)} of "
                f"KV cache beside the model's {format_bytes(loaded.size_bytes)}: more than this worker's whole "
                f"budget of {format_bytes(self.cache.budget_bytes)}; ask for fewer tokens",
                param="max_tokens",
            )
        rows = [m.context for m in batch.members.values()] + [context]
        if self.cache.room_for(per_token * max(rows) * len(rows)):
            return True
        if batch.members:
            return False
        raise InsufficientMemory(
            f"No room for {format_bytes(per_token * context)} of KV cache: the budget is "
            f"{format_bytes(self.cache.budget_bytes)} and {format_bytes(self.cache.held_bytes)} is held",
            retry_after_s=self.cache.settings.memory_retry_after_s,
        )

    def _count_kv(self) -> None:
        batch = self._batch
        members = list(batch.members.values()) if batch is not None else []
        if batch is None or not members:
            self.cache.kv_bytes = 0
            return
        entry = self.cache.entry(batch.model)
        per_token = entry.kv_bytes_per_token if entry is not None else 0
        self.cache.kv_bytes = per_token * max(m.context for m in members) * len(members)

    def has_room(self, held: int) -> bool:
        """Whether a job claimed now could join soon (any thread): the worker's `held` jobs, and
        what the engine runs or has waiting, are under the batch limit, and no job waits for KV room."""
        batch = self._batch  # once: the engine thread may drop it meanwhile
        members = len(batch.members) if batch is not None else 0
        engine_side = members + len(self._waiting) + self._inbox.qsize()
        return not self._waiting_for_room and max(held, engine_side) < self.batch_limit

    def _prepare(self, handle: Generation) -> _Prepared | None:
        """Acquire the model (loading it if need be) and encode the prompt; None after a failure,
        which ends the submission."""
        sub = handle.submission
        # KV headroom for the load decision; a token is rarely shorter than 3 characters.
        context = sub.max_tokens + math.ceil(sub.request.prompt_chars() / 3)
        self.state = "loading"
        try:
            loaded, handle.load_s = self.cache.acquire(sub.spec, context)
        except Exception as exc:
            self._finish(handle, None, self._translated(exc, handle.job_id))
            return None
        finally:
            self.progress_at = time.monotonic()
        try:
            row = Row.start(loaded.tokenizer, sub.request, sub.on_text)
        except Exception as exc:
            self.cache.release(sub.spec.name)
            self._finish(handle, None, self._translated(exc, handle.job_id))
            return None
        prepared = self._prepared[handle.job_id] = _Prepared(loaded, row)
        return prepared

    def _unprepare(self, handle: Generation) -> None:
        if self._prepared.pop(handle.job_id, None) is not None:
            self.cache.release(handle.submission.spec.name)

    def _prefix_for(self, batch: _Batch, prepared: _Prepared) -> tuple[list[Any] | None, int] | None:
        """The KV cache to start from and the prompt tokens it holds; None while a member of the
        batch is still computing most of this prompt (a fan-out's children: computed once)."""
        ids = prepared.row.prompt_ids
        if not self.prefixes.enabled or not batch.shareable:
            return None, 0
        if prepared.sharer is None or prepared.sharer[0] not in batch.members:
            prepared.sharer = self._sharer(batch, ids)
        uid, shared = prepared.sharer
        member = batch.members.get(uid)
        # Worth waiting for, or copying out of a member, when the shared part is most of this prompt;
        # a short shared system prompt is not worth a long prompt's prefill or a row's copy.
        if member is None or 2 * shared < len(ids) or member.row.prompt_ids[:shared] != ids[:shared]:
            return self.prefixes.nearest(batch.model, ids)
        if not member.prefilled:
            return None
        cache, reused = self.prefixes.nearest(batch.model, ids)
        if reused >= shared:
            return cache, reused
        [(source, _)] = batch.generator.extract_cache([uid]).values()
        if not self.prefixes.keep(batch.model, ids[:shared], source):
            return cache, reused
        return self.prefixes.nearest(batch.model, ids)

    @staticmethod
    def _sharer(batch: _Batch, ids: list[int]) -> tuple[int, int]:
        """The member whose prompt shares the longest prefix with `ids`, and its length (at least
        MIN_SHARED_TOKENS, else (-1, 0)); the last token of each prompt is never shared."""
        best = (-1, 0)
        for uid, member in batch.members.items():
            other = member.row.prompt_ids
            shared = min(shared_length(ids, other), len(ids) - 1, len(other) - 1)
            if shared >= MIN_SHARED_TOKENS and shared > best[1]:
                best = (uid, shared)
        return best

    def _open_batch(self, model: str, loaded: LoadedModel) -> _Batch:
        generator = BatchGenerator(
            loaded.model,
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step_size=self.prefill_step_size,
        )
        self._batch = _Batch(model, generator, shareable=shareable(make_prompt_cache(loaded.model)))
        return self._batch

    def _close_batch(self) -> None:
        if self._batch is not None:
            self._batch.generator.close()
            self._batch = None
            self.cache.kv_bytes = 0
            for prepared in self._prepared.values():
                prepared.sharer = None  # uids start again at 0 in the next batch

    # -- one step ---------------------------------------------------------------------------

    def _step(self) -> None:
        batch = self._batch
        assert batch is not None
        try:
            _, responses = batch.generator.next()
        except Exception as exc:
            # The step is shared: every member fails with it (and the process lives on). Their
            # hold on the model goes first, so that a memory cleanup can unload it.
            failed = list(batch.members.values())
            batch.members.clear()
            self._close_batch()
            for gone in failed:
                self.cache.release(gone.handle.submission.spec.name)
            error = self._translated(exc, ",".join(m.handle.job_id for m in failed))
            for gone in failed:
                self._finish(gone.handle, None, error)
            return
        self.progress_at = time.monotonic()
        for response in responses:
            member = batch.members.get(response.uid)
            if member is None:
                continue
            member.prefilled = True
            member.generated.append(response.token)
            if response.finish_reason is not None and response.prompt_cache is not None:
                self._keep_for_later(batch.model, member, response.prompt_cache)
            finish = member.row.take(response.token, response.finish_reason, response.logprobs)
            if finish is None and response.finish_reason is not None:
                finish = "stop"
            if finish is not None:
                self._leave(response.uid, member.row.outcome(finish), None, remove=response.finish_reason is None)
        for uid, member in list(batch.members.items()):
            reason = member.handle.stop_reason()
            if reason == "canceled":
                self._leave(uid, None, GenerationCanceled("The job was canceled while it was running"), remove=True)
            elif reason == "timeout":
                tokens = member.row.completion_tokens
                self._leave(uid, None, JobTimedOut(f"The generation passed its deadline after {tokens} tokens"), True)
        if not batch.members:
            self._close_batch()  # its KV caches and its hold on the model go now, before any unload

    def _keep_for_later(self, model: str, member: _Member, cache: list[Any]) -> None:
        """A finished row's cache (its prompt and what it generated): the next turn of the same chat
        starts from it."""
        if not cache or not self.prefixes.enabled:
            return
        tokens = (member.row.prompt_ids + member.generated)[: cache[0].offset]
        try:
            self.prefixes.keep(model, tokens, cache)
        except Exception:
            logger.exception("could not keep a finished prompt's cache")

    def _leave(self, uid: int, outcome: Outcome | None, error: BaseException | None, remove: bool) -> None:
        """A member leaves the batch (the generator drops rows it ended itself; others are removed)."""
        batch = self._batch
        assert batch is not None
        member = batch.members.pop(uid)
        if remove:
            batch.generator.remove([uid])
        self.cache.release(member.handle.submission.spec.name)
        self._count_kv()
        if self._memory_pressed:
            self.batch_limit = max(1, min(self.batch_limit, len(batch.members)))  # no refill until it eases
        self._finish(member.handle, outcome, error)

    def _end_everything(self, error: MlxqError) -> None:
        if self._batch is not None:
            for uid in list(self._batch.members):
                self._leave(uid, None, error, remove=False)
            self._close_batch()
        while self._waiting:
            handle = self._waiting.popleft()
            self._unprepare(handle)
            self._finish(handle, None, error)

    def _finish(self, handle: Generation, outcome: Outcome | None, error: BaseException | None) -> None:
        with self._lock:
            self._active.pop(handle.job_id, None)
        if error is not None:
            # The error crosses to another thread and may live on with the job; its traceback's
            # frames would keep the model (and its MLX memory) alive past any unload.
            error.__traceback__ = error.__context__ = error.__cause__ = None
        handle._finish(outcome, error)

    def _translated(self, exc: BaseException, job_ids: str) -> BaseException:
        if isinstance(exc, MlxqError):
            return exc
        if is_allocation_failure(exc):
            # The job fails, the process lives: free what can be freed and take the next job.
            self.cache.emergency_cleanup(f"allocation failed during job {job_ids}")
            return InsufficientMemory(f"Memory ran out while generating: {exc}")
        logger.error("generation failed", exc_info=exc, extra={"job_id": job_ids})
        return GenerationFailed(f"Generation failed: {type(exc).__name__}: {exc}")
