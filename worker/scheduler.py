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

The executor it drives is an `Executor`: the engine's batch runner, or a plain
fake in the tests.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from shared.errors import ExceedsMemoryBudget, GenerationCanceled, InsufficientMemory, JobTimedOut
from shared.sizing import KvShape, format_bytes
from worker.ledger import MemoryLedger

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

StopReason = Literal["canceled", "timeout"]


@dataclass(eq=False)
class Ticket:
    """One generation as the scheduler sees it, from the waiting line to the end of its row."""

    job_id: str
    model: str
    max_tokens: int
    stop: Callable[[], StopReason | None] = lambda: None
    """Why it must end now (its handle's cancel or deadline, waiting or running), or None."""
    prompt: list[int] | None = None
    """Its prompt's token ids, once prepared (model acquired, prompt encoded)."""
    kv: KvShape = KvShape(per_token=0)
    """What its row's cache holds per token (its model's, measured once loaded)."""
    weights_bytes: int = 0
    sharer: tuple[int, int] | None = None
    """(uid, tokens): the member whose prompt starts like this one's, and for how many tokens."""
    prefilled: bool = False
    """In the batch, with its whole prompt in its KV cache (it has produced a token)."""
    in_cache: int = 0
    """Tokens in its KV cache so far: a member's grow as its prefill goes, then as it generates."""

    @property
    def prepared(self) -> bool:
        return self.prompt is not None

    @property
    def context(self) -> int:
        """Prompt plus max_tokens: the KV cache positions it may fill."""
        return len(self.prompt or ()) + self.max_tokens


@dataclass(frozen=True)
class Seed:
    """Where a joining row's KV cache starts: from kept prefixes, after copying `tokens` tokens of
    member `uid`'s cache into them when `uid` is set; `kept` False starts from nothing."""

    kept: bool = True
    uid: int | None = None
    tokens: int = 0


FRESH = Seed(kept=False)


class Executor(Protocol):
    """What the scheduler's decisions are carried out by (the engine's batch runner)."""

    def prepare(self, ticket: Ticket) -> bool:
        """Acquire the ticket's model and encode its prompt; False when that failed and ended it."""
        ...

    def open_batch(self, ticket: Ticket) -> bool:
        """Start a batch for the ticket's model; whether a member's cache can be shared with others
        (cut at any token)."""
        ...

    def close_batch(self) -> None: ...

    def make_room(self, kv_bytes: int) -> bool:
        """Whether the batch's KV cache may grow to `kv_bytes`, evicting what can go to make room."""
        ...

    def join(self, ticket: Ticket, seed: Seed) -> int | None:
        """Insert the ticket's row; its uid, or None when that failed and ended it."""
        ...

    def end(self, ticket: Ticket, error: BaseException) -> None:
        """End a ticket that is not in the batch with `error` (translated into ours if need be)."""
        ...


@dataclass
class Batch:
    """The running batch as the scheduler sees it: its model and members by uid."""

    model: str
    shareable: bool
    members: dict[int, Ticket] = field(default_factory=dict)


Joined = Literal["joined", "prefix", "room"]


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
    ) -> None:
        self.ledger = ledger
        self.max_batch = max_batch
        self.warning_percent = warning_percent
        self.critical_percent = critical_percent
        self.retry_after_s = retry_after_s
        self.share_prefixes = share_prefixes
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

    def fill(self, run: Executor) -> None:
        """Move waiting tickets into the batch while it has room and runs their model."""
        self._end_stopped_in_line(run)
        held: list[Ticket] = []
        self.waiting_for_room = False
        while self.line:
            ticket = self.line[0]
            if ticket.stop() is not None:  # canceled or late meanwhile (a model load takes a while)
                self._end_stopped_in_line(run)
                continue
            if self.batch is not None and self.batch.model != ticket.model:
                if self.batch.members:
                    break  # another model: it waits until this batch drains
                self.close(run)
            if self.batch is not None and len(self.batch.members) >= self.batch_limit:
                break
            self.line.popleft()
            joined = self._join(ticket, run)
            if joined == "prefix":
                held.append(ticket)
            elif joined == "room":
                self.line.appendleft(ticket)
                self.waiting_for_room = True
                break
        self.line.extendleft(reversed(held))

    def _end_stopped_in_line(self, run: Executor) -> None:
        """A canceled ticket, or one past its deadline, ends while it waits, as it would running."""
        for ticket in list(self.line):
            reason = ticket.stop()
            if reason is None:
                continue
            self.line.remove(ticket)
            if reason == "canceled":
                run.end(ticket, GenerationCanceled("The job was canceled before it started"))
            else:
                run.end(ticket, JobTimedOut("The job passed its deadline before it could start"))

    def _join(self, ticket: Ticket, run: Executor) -> Joined:
        """Start the ticket in the batch, or end it with its error ("joined"); "prefix" while it
        waits for a member computing the prefix it shares, "room" while the KV cache has none."""
        if not ticket.prepared and not run.prepare(ticket):
            return "joined"
        try:
            if self.batch is None:
                self.batch = Batch(ticket.model, shareable=run.open_batch(ticket))
            if not self.kv_room(ticket, run):
                return "room"
        except Exception as error:  # the executor translates what is not ours
            run.end(ticket, error)
            return "joined"
        seed = self.seed_for(ticket)
        if seed is None:
            return "prefix"
        uid = run.join(ticket, seed)
        if uid is not None:
            self.batch.members[uid] = ticket
            self._count_kv()
        return "joined"

    # -- KV room ------------------------------------------------------------------------

    def kv_room(self, ticket: Ticket, run: Executor) -> bool:
        """Whether the batch's KV cache fits the budget with this ticket's row too; False to wait
        for a member to leave. A context that cannot fit even alone fails at once; one that cannot
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
        members = list(self.batch.members.values()) if self.batch else []
        if run.make_room(padded_kv_bytes(kv, [m.context for m in members] + [context])):
            return True
        if members:
            return False
        raise InsufficientMemory(
            f"No room for {format_bytes(kv.bytes_for(context))} of KV cache: the budget is "
            f"{format_bytes(budget)} and {format_bytes(self.ledger.held_bytes)} is held",
            retry_after_s=self.retry_after_s,
        )

    def _count_kv(self) -> None:
        members = list(self.batch.members.values()) if self.batch else []
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
        uid, shared = ticket.sharer
        if uid < 0:
            return Seed()  # no member begins like it
        member = batch.members[uid]  # the same ticket as when the sharer was found: uids are not reused
        if member.in_cache >= shared and copyable(member.in_cache, shared):
            return Seed(uid=uid, tokens=shared)
        # Still being computed: worth waiting for when it is most of this prompt (a fan-out's
        # children) and can be copied once the member's prompt is in; a short shared opening is not
        # worth holding a long prompt back.
        waits = shared >= MIN_SHARED_TOKENS and 2 * shared >= len(ids)
        if member.in_cache < shared and waits and copyable(len(member.prompt or ()), shared):
            return None
        # The longest sharer cannot be copied from now: the most that any member holds now can.
        return held_now(batch.members, ids)

    # -- leaving ------------------------------------------------------------------------

    def leave(self, uid: int) -> Ticket:
        """A member leaves the batch; under memory pressure nobody takes its place until it eases."""
        assert self.batch is not None
        ticket = self.batch.members.pop(uid)
        self._count_kv()
        if self._pressed:
            self.batch_limit = max(1, min(self.batch_limit, len(self.batch.members)))
        return ticket

    def close(self, run: Executor) -> None:
        """The batch ends (drained, or for another model); waiting tickets forget their sharers,
        since uids start again at 0 in the next batch."""
        if self.batch is None:
            return
        run.close_batch()
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
        batch = self.batch  # once: the engine thread may drop it meanwhile
        members = len(batch.members) if batch is not None else 0
        engine_side = members + len(self.line) + arriving
        return not self.waiting_for_room and max(held, engine_side) < self.batch_limit


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


def held_now(members: dict[int, Ticket], ids: Sequence[int]) -> Seed:
    """A copy of the longest start of `ids` that a member's cache holds now (at least
    MIN_COPIED_TOKENS, and copyable), else a fresh start."""
    best = Seed()
    for uid, member in members.items():
        other = member.prompt or []
        held = min(shared_length(ids, other), len(ids) - 1, len(other) - 1, member.in_cache)
        if held >= MIN_COPIED_TOKENS and held > best.tokens and copyable(member.in_cache, held):
            best = Seed(uid=uid, tokens=held)
    return best


def sharer(members: dict[int, Ticket], ids: Sequence[int]) -> tuple[int, int]:
    """The member whose prompt shares the longest prefix with `ids`, and its length (at least
    MIN_COPIED_TOKENS, else (-1, 0)); the last token of each prompt is never shared."""
    best = (-1, 0)
    for uid, member in members.items():
        other = member.prompt or []
        shared = min(shared_length(ids, other), len(ids) - 1, len(other) - 1)
        if shared >= MIN_COPIED_TOKENS and shared > best[1]:
            best = (uid, shared)
    return best
