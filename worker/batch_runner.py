"""The executor of the scheduler's decisions: mlx-lm's BatchGenerator, its rows and their ends.

Runs only on the engine thread (worker/engine.py). It carries out a
`SchedulerOutput` (worker/scheduler.py): acquire a ticket's model and encode its
prompt, end tickets, close and open the batch, make room for its KV cache,
insert rows from kept caches (worker/kv_manager.py); and it takes one decode step,
hands each token to its row (worker/rows.py) and finishes rows that end (their
length, a stop, a cancel, their deadline). What it did goes back to the scheduler
as a `StepResult`; it writes no ticket's state itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from mlx_lm.generate import BatchGenerator

from shared.errors import (
    ContextLengthExceeded,
    GenerationCanceled,
    InsufficientMemory,
    JobTimedOut,
    MlxqError,
    ModelUnavailable,
)
from worker.generation import Generation
from worker.kv_manager import KVCacheManager
from worker.model_cache import LoadedModel, ModelCache
from worker.prefill_pace import PrefillPace, unpadded
from worker.rows import Outcome, Row
from worker.scheduler import Scheduler
from worker.tickets import Prepared, SchedulerOutput, Seed, StepResult, Ticket


@dataclass
class Run:
    """The executor's side of a ticket: its handle, and once prepared its model and row."""

    handle: Generation
    ticket: Ticket
    loaded: LoadedModel | None = None
    row: Row | None = None
    generated: list[int] = field(default_factory=list)
    reused: int = 0
    """Prompt tokens its KV cache started with (a kept prefix, or a copy of a member's)."""
    uid: int | None = None
    """Its row in the generator, once it joined."""
    max_tokens: int = 0
    """Its tokens to generate, once prepared (less what an earlier attempt made; within the context)."""


class BatchRunner:
    """Executes the scheduler's decisions on one BatchGenerator at a time."""

    def __init__(
        self,
        cache: ModelCache,
        kv: KVCacheManager,
        scheduler: Scheduler,
        finished: Callable[[Generation, Outcome | None, BaseException | None], None],
        pace: PrefillPace,
        prefill_batch_size: int,
        on_progress: Callable[[str | None], None],
    ) -> None:
        """`finished` hands an ended generation back to the engine; `on_progress` is called at each
        sign of life, with the engine's new state ("loading") when it changes."""
        self.cache = cache
        self.kv = kv
        self.scheduler = scheduler
        self._finished = finished
        self._progress = on_progress
        # Prompts are prefilled in pieces between decode steps, each sized by time (worker/prefill_pace.py);
        # those arriving together are prefilled together, up to prefill_batch_size.
        self.pace = pace
        self.prefill_batch_size = min(prefill_batch_size, scheduler.max_batch)
        self.runs: dict[Ticket, Run] = {}
        """By ticket, not job id: a job handed back and claimed again may meet its old run here."""
        self.generator: Any = None
        self._keeps_states = False
        """The batch's model has caches that cannot be cut at any token: states are kept where later
        prompts extend them (the ends of the system messages and of the prompt), not cut from longer ones."""
        self._uids: dict[int, Run] = {}
        self._turn_ended: float | None = None
        """When the batch's last turn ended: a running stream's gap is the time from one to the next."""
        self.tokens_generated = 0
        """Tokens this process generated so far (the heartbeat's, for tokens per second)."""

    def add(self, handle: Generation) -> None:
        sub = handle.submission
        ticket = Ticket(handle.job_id, sub.spec.name, sub.max_tokens, handle.stop_reason)
        self.runs[ticket] = Run(handle, ticket)
        self.scheduler.add(ticket)

    # -- carrying out the scheduler's output -------------------------------------------------

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Carry out one turn's decisions, in order; what happened."""
        result = StepResult()
        for ticket in out.prepare:
            prepared = self._prepare(ticket)
            if prepared is None:
                result.ended.append(ticket)
            else:
                result.prepared.append(prepared)
        for ticket, error in out.ended:
            self.end(ticket, error)
        if out.close:
            self.close_batch()
        if not out.joins:
            return result
        if out.open:
            self._open(out.joins[0][0])
        if out.kv_bytes is not None and not self.cache.room_for(out.kv_bytes):
            for ticket, _ in out.joins:
                self.end(ticket, InsufficientMemory("No room for the batch's KV cache: memory was taken meanwhile"))
                result.ended.append(ticket)
            return result
        for ticket, seed in out.joins:
            reused = self._join(ticket, seed)
            if reused is None:
                result.ended.append(ticket)
            else:
                result.in_cache[ticket] = reused
        return result

    def _prepare(self, ticket: Ticket) -> Prepared | None:
        """Acquire the ticket's model and encode its prompt; None when that ended it."""
        run = self.runs[ticket]
        sub = run.handle.submission
        # KV headroom for the load decision; a token is rarely shorter than 3 characters.
        context = ticket.max_tokens + math.ceil(sub.request.prompt_chars() / 3)
        self._progress("loading")
        try:
            run.loaded, run.handle.load_s = self.cache.acquire(sub.spec, context, sub.request.keep_alive)
        except Exception as exc:
            self._finish(run, None, self._translated(exc, ticket.job_id))
            return None
        finally:
            self._progress(None)
        loaded = run.loaded
        self.kv.serving(ticket.model, loaded.model, loaded.identity, loaded.caches.cuttable)
        try:
            row = Row.start(run.loaded.tokenizer, sub.request, sub.max_tokens, sub.on_text, sub.spec.reasoning)
            if sub.resume is not None and sub.resume.seq:
                row.resume(sub.resume)
        except Exception as exc:
            self._finish(run, None, self._translated(exc, ticket.job_id))
            return None
        run.row = row
        if row.ended_before is not None:
            self._finish(run, row.outcome(row.ended_before), None)  # told again, nothing generated
            return None
        prompt, window = len(row.prompt_ids), run.loaded.context_tokens
        if window is not None and prompt >= window:
            field = "prompt" if sub.request.prompt is not None else "messages"
            self._finish(run, None, ContextLengthExceeded.of_prompt(prompt, window, param=field))
            return None
        # What an earlier attempt generated counts against max_tokens (its tokens are prefilled).
        max_tokens = ticket.max_tokens - len(row.resumed_tokens)
        if window is not None:
            # max_tokens is a ceiling: the generation stops at the context's end ("length").
            max_tokens = min(max_tokens, window - len(row.context_ids))
        if max_tokens <= 0:
            self._finish(run, row.outcome("length"), None)  # the earlier attempt got to the end
            return None
        caches = run.loaded.caches
        if caches.unbatched:
            error = ModelUnavailable(
                f"Model '{ticket.model}' keeps a cache mlx-lm cannot batch ({', '.join(caches.unbatched)}); "
                "mlxq serves every model through mlx-lm's BatchGenerator"
            )
            self._finish(run, None, error)
            return None
        run.max_tokens = max_tokens
        return Prepared(ticket, row.context_ids, max_tokens, run.loaded.kv, run.loaded.size_bytes, caches.cuttable)

    def _open(self, ticket: Ticket) -> None:
        """A batch for the ticket's model (prepared: its model is held)."""
        loaded = self.runs[ticket].loaded
        assert loaded is not None
        self.pace.serving(ticket.model)
        self._turn_ended = None
        self.generator = BatchGenerator(
            loaded.model,
            completion_batch_size=self.scheduler.max_batch,
            prefill_batch_size=self.prefill_batch_size,
            # The ceiling: its prompt batch prefills what each step is given (`_next_piece`) in one call.
            prefill_step_size=self.pace.max_tokens,
        )
        if loaded.caches.recurrent:
            # mlx-lm pads the rows of a prompt batch to the longest, and its batched Mamba layers are not
            # exact over that padding (a row's answer would depend on its neighbours): one row at a time.
            self.generator.prefill_batch_size = 1
        self._keeps_states = not loaded.caches.cuttable

    def close_batch(self) -> None:
        generator, self.generator = self.generator, None  # gone even if its close fails
        if generator is not None:
            generator.close()

    def _join(self, ticket: Ticket, seed: Seed) -> int | None:
        """Insert the ticket's row; the prompt tokens its cache starts with, or None when that ended it."""
        run = self.runs[ticket]
        assert run.row is not None
        ids = run.row.context_ids
        try:
            cache, reused = self._seeded(ticket.model, ids, seed)
            [uid] = self.generator.insert_segments(
                [self.kv.segments(ticket.model, run.row, reused, self._keeps_states)],
                max_tokens=[run.max_tokens],
                caches=[cache],
                all_tokens=[ids[:reused]],
                **run.row.batch_options(),
            )
        except Exception as exc:
            self._finish(run, None, self._translated(exc, ticket.job_id))
            return None
        run.row.cached_tokens = min(reused, len(run.row.prompt_ids))
        run.reused, run.uid = reused, int(uid)
        self._uids[run.uid] = run
        return reused

    def _seeded(self, model: str, ids: list[int], seed: Seed) -> tuple[list[Any] | None, int]:
        """The KV cache a row starts from and the prompt tokens it holds."""
        if not seed.kept:
            return None, 0
        cache, reused = self.kv.seed(model, ids)
        source_run = None if seed.source is None else self.runs.get(seed.source)
        if source_run is None or source_run.uid is None or reused >= seed.tokens:
            return cache, reused
        # The scheduler copies only from a member that holds the prefix (its in_cache); `keep_copy`
        # checks the length of what was extracted.
        [(source, held)] = self.generator.extract_cache([source_run.uid]).values()
        if not self.kv.keep_copy(model, ids[: seed.tokens], source, len(held)):
            return cache, reused
        return self.kv.seed(model, ids)

    def end(self, ticket: Ticket, error: BaseException) -> None:
        run = self.runs.get(ticket)
        if run is not None:  # not ended already
            self._finish(run, None, self._translated(error, ticket.job_id))

    # -- one step -------------------------------------------------------------------------

    def step(self) -> StepResult:
        """One decode step (and maybe one prefill chunk) of the batch; rows that end leave, and the
        batch closes when none is left (its KV caches and its hold on the model go before any unload)."""
        self.generator.prefill_step_size = self._next_piece()
        try:
            with self.generator.stats() as done:
                prompted, responses = self.generator.next()
        except Exception as exc:
            return self.fail_running(exc)  # the step is shared: every member fails with it
        result = StepResult()
        ended = time.perf_counter()
        turn_s = None if self._turn_ended is None else ended - self._turn_ended
        self._turn_ended = ended
        self.pace.measured(done.prompt_tokens, done.prompt_time, done.generation_steps, done.decode_time, turn_s)
        self.tokens_generated += len(responses)
        self._progress(None)  # after every piece of prefill too: the watchdog sees a long prompt advance
        for prompt in prompted:
            prefilling = self._uids.get(prompt.uid)
            if prefilling is None:
                continue
            # What others beginning alike may copy from now (worker/scheduler.py seed_for).
            result.in_cache[prefilling.ticket] = prefilling.reused + int(prompt.progress[0])
            if prompt.end_of_prompt:
                result.prefilled.append(prefilling.ticket)  # its prompt is in its cache; it decodes
            elif prompt.end_of_segment and self._keeps_states:
                extract = partial(self.generator.extract_cache, [prompt.uid])
                self.kv.state_reached(prefilling.ticket.model, extract, prefilling.ticket.job_id)
        for response in responses:
            run = self._uids.get(response.uid)
            if run is None:
                continue
            assert run.row is not None
            result.prefilled.append(run.ticket)
            run.generated.append(response.token)
            result.in_cache[run.ticket] = len(run.row.context_ids) + len(run.generated)
            run.handle.generated = len(run.generated)
            if response.finish_reason is not None and response.prompt_cache is not None:
                prompt = len(run.row.prompt_ids)
                self.kv.finished(
                    run.ticket.model, response.all_tokens, response.prompt_cache, run.ticket.job_id, prompt
                )
            finish = run.row.take(response.token, response.finish_reason, response.logprobs)
            if finish is None and response.finish_reason is not None:
                finish = "stop"
            if finish is not None:
                self._leave(response.uid, run.row.outcome(finish), None, response.finish_reason is None, result)
        for uid, run in list(self._uids.items()):
            reason = run.ticket.stop()
            if reason == "canceled":
                canceled = GenerationCanceled("The job was canceled while it was running")
                self._leave(uid, None, canceled, True, result)
            elif reason == "timeout":
                assert run.row is not None
                late = JobTimedOut(f"The generation passed its deadline after {run.row.completion_tokens} tokens")
                self._leave(uid, None, late, True, result)
        if not self._uids:
            self.close_batch()
            result.closed = True
        return result

    def _next_piece(self) -> int:
        """Prompt tokens of each prefilling row the next step takes, sized so that the rows decoding
        beside them pause for no more than the pace allows, and cut so that short prompts are not
        padded to a long one's piece."""
        batch = self.scheduler.batch
        members = list(batch.members) if batch is not None else []  # in the order they joined: as inserted
        # The generator prefills the first rows inserted, as many as its prompt batch holds; a prompt's
        # last token is not prefilled (it is the row's first decode input).
        prefilling = [m for m in members if not m.prefilled][: self.generator.prefill_batch_size]
        remaining = [len(m.prompt or ()) - 1 - m.in_cache for m in prefilling]
        piece = self.pace.piece(decoding=any(m.prefilled for m in members), rows=sum(r > 0 for r in remaining))
        return unpadded(piece, remaining)

    def _leave(
        self, uid: int, outcome: Outcome | None, error: BaseException | None, remove: bool, result: StepResult
    ) -> None:
        """A member leaves the batch (the generator drops rows it ended itself; others are removed)."""
        run = self._uids.pop(uid)
        if remove:
            self.generator.remove([uid])
        result.ended.append(run.ticket)
        self._finish(run, outcome, error)

    def fail_running(self, exc: BaseException) -> StepResult:
        """Every member of the batch, and any ticket taken from the line but not yet in it, ends with
        `exc` (translated); the batch closes and the process lives on. Their hold on the model goes
        first, so that a memory cleanup can unload it."""
        waiting = set(self.scheduler.line)
        failed = [run for ticket, run in self.runs.items() if ticket not in waiting]
        self._uids.clear()
        for run in failed:
            self._release(run)
        error = self._translated(exc, ",".join(run.ticket.job_id for run in failed))
        try:
            self.close_batch()
        finally:  # a close that fails too (the device's error again) still ends every one of them
            for run in failed:
                self._finish(run, None, error)
        return StepResult(ended=[run.ticket for run in failed], closed=True)

    def end_everything(self, error: MlxqError) -> None:
        """The engine stops: every member and every waiting ticket ends with `error`."""
        self._uids.clear()
        try:
            self.close_batch()
        finally:
            for ticket in self.scheduler.drain():
                self.end(ticket, error)

    # -- ending -------------------------------------------------------------------------

    def _release(self, run: Run) -> None:
        if run.loaded is not None:
            self.cache.release(run.ticket.model)
            run.loaded = None

    def _finish(self, run: Run, outcome: Outcome | None, error: BaseException | None) -> None:
        self._release(run)
        self.runs.pop(run.ticket, None)
        self._finished(run.handle, outcome, error)

    def _translated(self, exc: BaseException, job_ids: str) -> BaseException:
        return self.cache.failure(exc, job_ids, "generating", "Generation")
