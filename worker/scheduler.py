"""Who joins the running batch, who waits and who leaves: the engine's decisions, as plain data.

The engine (worker/engine.py) owns the MLX thread and executes; this module
decides, and imports no MLX, so every decision is unit-tested with plain numbers
(tests/test_scheduler.py). What it decides:

- the waiting line: first come, first served; a ticket for another model waits
  until the batch drains; one that waits for KV room stops the line (a long
  context is not overtaken by short ones) and the worker claims nothing meanwhile;
  one that waits for a member computing the prefix it shares lets the others by;
- KV room: the batch pads rows to the longest, so it holds rows x the longest
  context, asked of the memory ledger (kept prefixes and idle models make way);
- prefix sharing: which member's prompt this one's starts like, and whether that
  is worth waiting for or copying;
- the batch limit under memory pressure, and deadlines and cancels in the line.

It decides as vLLM v1's scheduler does: `schedule()` returns a `SchedulerOutput`
(plain data: who is prepared, who ends and why, whether the batch closes or
opens, how far its KV cache grows, who joins and from which cached state), the
batch runner carries it out, and `update_from_output` takes what happened (a
`StepResult`: tickets prepared, rows that advanced, finished or failed). Only
the scheduler writes a ticket's state, and it never calls the executor.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

from shared.errors import ExceedsMemoryBudget, GenerationCanceled, InsufficientMemory, JobTimedOut
from shared.sizing import KvShape, format_bytes
from worker.ledger import MemoryLedger
from worker.tickets import FRESH, Batch, SchedulerOutput, Seed, StepResult, Ticket

logger = logging.getLogger(__name__)

MIN_SHARED_TOKENS = 32
"""Below this, a shared prefix still to be computed is not worth waiting for: computing it again costs
less than a step's wait."""

COPY_SLACK_TOKENS = 1024
"""How far past a shared part a member's cache may reach and still be copied from: mlx-lm extracts a
row's whole cache before it is cut to the shared part, memory held for a moment beside the batch."""

MIN_COPIED_TOKENS = 8
"""A shared prefix already in a member's cache is copied from this long (as worker/kv_manager.py reuses a
kept one): copying is a slice of memory, computing it a pass over all of the model's weights. Requests
that arrive together and begin alike (a chat template's opening, a system prompt) compute it once."""


class Scheduler:
    """The waiting line and the running batch's membership, under a batch limit and the ledger."""

    def __init__(
        self,
        ledger: MemoryLedger,
        max_batch: int,
        warning_percent: float,
        critical_percent: float,
        retry_after_s: int,
        share_prefixes: bool,
        kv_room: Callable[[], int],
    ) -> None:
        """`kv_room` says how many bytes the running batch's KV cache may take (any thread): the budget
        less what cannot give way to it (models in use or pinned; kept caches and idle models can)."""
        self.ledger = ledger
        self.max_batch = max_batch
        self.warning_percent = warning_percent
        self.critical_percent = critical_percent
        self.retry_after_s = retry_after_s
        self.share_prefixes = share_prefixes
        self._kv_room = kv_room
        self.batch_limit = max_batch
        """max_batch, lowered while system memory is past its warning threshold."""
        self.line: deque[Ticket] = deque()
        self.batch: Batch | None = None
        self.waiting_for_room = False
        self._pressed = False

    # -- the waiting line ---------------------------------------------------------------

    def add(self, ticket: Ticket) -> None:
        self.line.append(ticket)

    @property
    def busy(self) -> bool:
        return bool(self.line) or bool(self.batch and self.batch.members)

    def schedule(self) -> SchedulerOutput:
        """Move waiting tickets into the batch while it has room and runs their model. A ticket at the
        front that is not prepared yet is asked for (`prepare`) and the turn's decisions stop there:
        schedule again once the output is carried out."""
        out = SchedulerOutput()
        self._end_stopped_in_line(out)
        held: list[Ticket] = []
        self.waiting_for_room = False
        while self.line:
            ticket = self.line[0]
            if ticket.stop() is not None:  # canceled or late meanwhile (a model load takes a while)
                self._end_stopped_in_line(out)
                continue
            if self.batch is not None and self.batch.model != ticket.model:
                if self.batch.members:
                    break  # another model: it waits until this batch drains
                self._close(out)
            if self.batch is not None and len(self.batch.members) >= self.batch_limit:
                break
            if not ticket.prepared:
                out.prepare.append(ticket)
                break
            self.line.popleft()
            joined = self._join(ticket, out)
            if joined == "prefix":
                held.append(ticket)
            elif joined == "room":
                self.line.appendleft(ticket)
                self.waiting_for_room = True
                break
        self.line.extendleft(reversed(held))
        if self.batch is not None and not self.batch.members and not out.prepare:
            self._close(out)  # drained, and nobody joins it now
        return out

    def _end_stopped_in_line(self, out: SchedulerOutput) -> None:
        """A canceled ticket, or one past its deadline, ends while it waits, as it would running."""
        for ticket in list(self.line):
            reason = ticket.stop()
            if reason is None:
                continue
            self.line.remove(ticket)
            if reason == "canceled":
                out.ended.append((ticket, GenerationCanceled("The job was canceled before it started")))
            else:
                out.ended.append((ticket, JobTimedOut("The job passed its deadline before it could start")))

    def _join(self, ticket: Ticket, out: SchedulerOutput) -> Literal["joined", "prefix", "room"]:
        """Start the ticket in the batch, or end it with its error ("joined"); "prefix" while it
        waits for a member computing the prefix it shares, "room" while the KV cache has none."""
        members = self.batch.members if self.batch is not None else []
        try:
            kv_bytes = self._kv_room_for(ticket, members)
        except (ExceedsMemoryBudget, InsufficientMemory) as error:
            out.ended.append((ticket, error))
            return "joined"
        if kv_bytes is None:
            return "room"
        if self.batch is None:
            self.batch = Batch(ticket.model, shareable=ticket.cuttable)
            out.open = True
        seed = self.seed_for(ticket)
        if seed is None:
            return "prefix"
        out.kv_bytes = kv_bytes
        out.joins.append((ticket, seed))
        self.batch.members.append(ticket)
        ticket.in_cache = 0
        self._count_kv()
        return "joined"

    # -- what the executor did --------------------------------------------------------------

    def update_from_output(self, result: StepResult) -> None:
        """Take in what carrying out an output or a step did: prepared tickets get their numbers, rows
        their progress; ended tickets leave the line or the batch (under memory pressure nobody takes a
        leaver's place until it eases)."""
        for prepared in result.prepared:
            ticket = prepared.ticket
            ticket.prompt, ticket.max_tokens = prepared.prompt, prepared.max_tokens
            ticket.kv, ticket.weights_bytes, ticket.cuttable = prepared.kv, prepared.weights_bytes, prepared.cuttable
        for ticket, tokens in result.in_cache.items():
            ticket.in_cache = tokens
        for ticket in result.prefilled:
            ticket.prefilled = True
        for ticket in result.ended:
            if ticket in self.line:
                self.line.remove(ticket)
            elif self.batch is not None and ticket in self.batch.members:
                self.batch.members.remove(ticket)
                self._count_kv()
                if self._pressed:
                    self.batch_limit = max(1, min(self.batch_limit, len(self.batch.members)))
        if result.closed:
            self._close(None)

    def drain(self) -> list[Ticket]:
        """Every ticket, waiting or running, and the batch gone (the engine stops)."""
        everyone = [*(self.batch.members if self.batch is not None else []), *self.line]
        self.line.clear()
        self._close(None)
        return everyone

    # -- KV room ------------------------------------------------------------------------

    def _kv_room_for(self, ticket: Ticket, members: list[Ticket]) -> int | None:
        """The batch's KV bytes with this ticket's row too, when they fit the room there is; None to
        wait for a member to leave. A context that cannot fit even alone fails at once; one that cannot
        fit an empty batch, for now."""
        budget = self.ledger.budget_bytes
        kv, context = ticket.kv, ticket.context
        if ticket.weights_bytes + kv.bytes_for(context) > budget:
            raise ExceedsMemoryBudget(
                f"{context} tokens of context (prompt + max_tokens) need {format_bytes(kv.bytes_for(context))} of "
                f"KV cache beside the model's {format_bytes(ticket.weights_bytes)}: more than this worker's whole "
                f"budget of {format_bytes(budget)}; ask for fewer tokens",
                param="max_tokens",
            )
        needed = padded_kv_bytes(kv, [m.context for m in members] + [context])
        if needed <= self._kv_room():
            return needed
        if members:
            return None
        raise InsufficientMemory(
            f"No room for {format_bytes(kv.bytes_for(context))} of KV cache: the budget is "
            f"{format_bytes(budget)} and {format_bytes(self.ledger.held_bytes)} is held",
            retry_after_s=self.retry_after_s,
        )

    def _count_kv(self) -> None:
        members = self.batch.members if self.batch else []
        kv = members[0].kv if members else KvShape(per_token=0)
        self.ledger.hold_kv(padded_kv_bytes(kv, [m.context for m in members]))

    # -- prefix sharing -----------------------------------------------------------------

    def seed_for(self, ticket: Ticket) -> Seed | None:
        """Where the ticket's KV cache starts; None while a member of the batch is still computing
        most of its prompt (a fan-out's children: computed once)."""
        batch, ids = self.batch, ticket.prompt or []
        if batch is None or not self.share_prefixes:
            return FRESH
        if not batch.shareable:
            return Seed()  # caches that cannot be cut: kept states only, never a member's cut short
        if ticket.sharer is None or ticket.sharer[0] not in batch.members:
            ticket.sharer = sharer(batch.members, ids)
        member, shared = ticket.sharer
        if member is None:
            return Seed()  # no member begins like it
        if member.in_cache >= shared and copyable(member.in_cache, shared):
            return Seed(source=member, tokens=shared)
        # Still being computed: worth waiting for when it is most of this prompt (a fan-out's
        # children) and can be copied once the member's prompt is in; a short shared opening is not
        # worth holding a long prompt back.
        waits = shared >= MIN_SHARED_TOKENS and 2 * shared >= len(ids)
        if member.in_cache < shared and waits and copyable(len(member.prompt or ()), shared):
            return None
        # The longest sharer cannot be copied from now: the most that any member holds now can.
        return held_now(batch.members, ids)

    # -- closing ------------------------------------------------------------------------

    def _close(self, out: SchedulerOutput | None) -> None:
        """The batch ends (drained, or for another model); waiting tickets forget their sharers, the
        members of a batch that is gone."""
        if self.batch is None:
            return
        if out is not None:
            out.close = True
        self.batch = None
        self.ledger.hold_kv(0)
        for ticket in self.line:
            ticket.sharer = None

    # -- the batch limit ----------------------------------------------------------------

    def limit_batch(self, used_percent: float) -> None:
        """Past the warning threshold the batch takes no one new; past the critical one it shrinks to
        half as its rows end. Rows are never cut short: memory is given back as they finish."""
        running = len(self.batch.members) if self.batch is not None else 0
        self._pressed = used_percent >= self.warning_percent
        if used_percent >= self.critical_percent:
            limit = max(1, running // 2)
        elif self._pressed:
            limit = max(1, min(running, self.batch_limit))
        else:
            limit = self.max_batch
        if limit != self.batch_limit:
            logger.info("batch limit %d -> %d: system memory at %.1f %%", self.batch_limit, limit, used_percent)
            self.batch_limit = limit

    def has_room(self, held: int, arriving: int) -> bool:
        """Whether a job claimed now could join soon (any thread): the worker's `held` jobs, and
        what runs, waits or is `arriving`, are under the batch limit, and no ticket waits for KV room."""
        return self.room(held, arriving) > 0

    def room(self, held: int, arriving: int) -> int:
        """How many jobs claimed now could join soon (any thread), as `has_room` counts."""
        batch = self.batch  # once: the engine thread may drop it meanwhile
        members = len(batch.members) if batch is not None else 0
        engine_side = members + len(self.line) + arriving
        return 0 if self.waiting_for_room else max(0, self.batch_limit - max(held, engine_side))


def padded_kv_bytes(kv: KvShape, contexts: Sequence[int]) -> int:
    """KV bytes of a batch whose rows have these contexts: rows are padded to the longest."""
    return kv.bytes_for(max(contexts, default=0)) * len(contexts)


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def copyable(held: int, shared: int) -> bool:
    """Whether `shared` tokens are copied from a member holding `held`: the copy goes through the
    member's whole cache, so a member far past the shared part (a long prompt or generation of its
    own) is copied from only where the shared part is worth as much."""
    return held - shared <= max(shared, COPY_SLACK_TOKENS)


def held_now(members: Sequence[Ticket], ids: Sequence[int]) -> Seed:
    """A copy of the longest start of `ids` that a member's cache holds now (at least
    MIN_COPIED_TOKENS, and copyable), else a fresh start."""
    best = Seed()
    for member in members:
        other = member.prompt or []
        held = min(shared_length(ids, other), len(ids) - 1, len(other) - 1, member.in_cache)
        if held >= MIN_COPIED_TOKENS and held > best.tokens and copyable(member.in_cache, held):
            best = Seed(source=member, tokens=held)
    return best


def sharer(members: Sequence[Ticket], ids: Sequence[int]) -> tuple[Ticket | None, int]:
    """The member whose prompt shares the longest prefix with `ids`, and its length (at least
    MIN_COPIED_TOKENS, else (None, 0)); the last token of each prompt is never shared."""
    best: tuple[Ticket | None, int] = (None, 0)
    for member in members:
        other = member.prompt or []
        shared = min(shared_length(ids, other), len(ids) - 1, len(other) - 1)
        if shared >= MIN_COPIED_TOKENS and shared > best[1]:
            best = (member, shared)
    return best
