"""Tickets and what is decided about them: the plain data between the scheduler (worker/scheduler.py)
and the batch runner (worker/batch_runner.py). No MLX here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from shared.sizing import KvShape

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
    cuttable: bool = True
    """Its model's caches can be cut at any token (a member's may be copied for others)."""
    sharer: tuple[Ticket | None, int] | None = None
    """The member whose prompt starts like this one's (None when none does) and for how many tokens;
    None until looked for."""
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
    """Where a joining row's KV cache starts: from kept caches, after copying `tokens` tokens of
    member `source`'s cache into them when it is set; `kept` False starts from nothing."""

    kept: bool = True
    source: Ticket | None = None
    tokens: int = 0


FRESH = Seed(kept=False)


@dataclass
class SchedulerOutput:
    """One turn's decisions, carried out in this order by the batch runner."""

    prepare: list[Ticket] = field(default_factory=list)
    """To prepare (acquire the model, encode the prompt) before anything is decided about them."""
    ended: list[tuple[Ticket, BaseException]] = field(default_factory=list)
    """Tickets that end without joining (canceled, late, too large, no room), and why."""
    close: bool = False
    """The batch closes (another model's turn, or it drained)."""
    open: bool = False
    """The batch opens, for the model of the first to join (after a close, if both)."""
    kv_bytes: int | None = None
    """The batch's KV cache grows to this: room is made for it (kept caches, then idle models, give way)."""
    joins: list[tuple[Ticket, Seed]] = field(default_factory=list)


@dataclass(frozen=True)
class Prepared:
    """What preparing a ticket found, in numbers."""

    ticket: Ticket
    prompt: list[int]
    max_tokens: int
    kv: KvShape
    weights_bytes: int
    cuttable: bool


@dataclass
class StepResult:
    """What carrying out an output, or a decode step, did."""

    prepared: list[Prepared] = field(default_factory=list)
    ended: list[Ticket] = field(default_factory=list)
    """Tickets that are over: failed preparing or joining, finished, failed, canceled or late in the batch."""
    in_cache: dict[Ticket, int] = field(default_factory=dict)
    """Members' tokens in their KV caches now."""
    prefilled: list[Ticket] = field(default_factory=list)
    closed: bool = False
    """The executor closed the batch (it drained, or a shared step failed)."""


@dataclass
class Batch:
    """The running batch as the scheduler sees it: its model and members, in the order they joined."""

    model: str
    shareable: bool
    members: list[Ticket] = field(default_factory=list)
