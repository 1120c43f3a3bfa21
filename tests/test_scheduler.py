"""The scheduler's decisions with plain numbers: no MLX, no model (worker/scheduler.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shared.errors import ExceedsMemoryBudget, GenerationCanceled, InsufficientMemory, JobTimedOut
from shared.sizing import KvShape
from worker.ledger import MemoryLedger
from worker.scheduler import COPY_SLACK_TOKENS, Scheduler, padded_kv_bytes
from worker.tickets import Prepared, SchedulerOutput, Seed, StepResult, Ticket

PER_TOKEN = 10
WEIGHTS = 1_000


@dataclass
class Kept:
    """Kept prefix caches as bytes only."""

    nbytes: int = 0

    def shrink_to(self, budget_bytes: int) -> None:
        self.nbytes = min(self.nbytes, budget_bytes)

    def clear(self) -> None:
        self.nbytes = 0


@dataclass
class Record:
    """What the scheduler's outputs said, as plain records; a prepared ticket's numbers are supplied as the
    batch runner would find them (prompts from `prompts`), and room made in the ledger."""

    ledger: MemoryLedger
    prompts: dict[str, list[int]] = field(default_factory=dict)
    shareable: bool = True
    joined: list[tuple[str, Seed]] = field(default_factory=list)
    ended: dict[str, BaseException] = field(default_factory=dict)
    opened: int = 0
    closed: int = 0
    prepared: list[str] = field(default_factory=list)

    def execute(self, out: SchedulerOutput) -> StepResult:
        result = StepResult()
        for ticket in out.prepare:
            self.prepared.append(ticket.job_id)
            prompt = self.prompts.get(ticket.job_id, [1, 2, 3])
            kv = KvShape(PER_TOKEN)
            result.prepared.append(Prepared(ticket, prompt, ticket.max_tokens, kv, WEIGHTS, self.shareable))
        for ticket, error in out.ended:
            self.ended[ticket.job_id] = error
        self.closed += out.close
        self.opened += out.open
        if out.kv_bytes is not None:
            self.ledger.give_up_kept(kv_bytes=out.kv_bytes)
        for ticket, seed in out.joins:
            self.joined.append((ticket.job_id, seed))
        return result


def scheduler(budget: int, kept: int = 0, max_batch: int = 16) -> tuple[Scheduler, Record]:
    ledger = MemoryLedger(budget, Kept(kept))
    ledger.hold_weights("m", WEIGHTS)
    sched = Scheduler(
        ledger,
        max_batch,
        warning_percent=85,
        critical_percent=95,
        retry_after_s=15,
        share_prefixes=True,
        kv_room=lambda: ledger.budget_bytes - ledger.weights_bytes,  # every model here is in use
    )
    return sched, Record(ledger)


def fill(sched: Scheduler, run: Record) -> None:
    """The engine's turn without its step: decide, carry out, and again while a ticket was prepared."""
    while True:
        out = sched.schedule()
        sched.update_from_output(run.execute(out))
        if not out.prepare:
            return


def leave(sched: Scheduler, *job_ids: str) -> None:
    """Members end (their rows finished)."""
    assert sched.batch is not None
    sched.update_from_output(StepResult(ended=[m for m in sched.batch.members if m.job_id in job_ids]))


def member(sched: Scheduler, job_id: str) -> Ticket:
    assert sched.batch is not None
    [found] = [m for m in sched.batch.members if m.job_id == job_id]
    return found


def ticket(job_id: str, max_tokens: int, model: str = "m", **kwargs: object) -> Ticket:
    return Ticket(job_id, model, max_tokens, **kwargs)  # type: ignore[arg-type]


def joined(run: Record) -> list[str]:
    return [job_id for job_id, _ in run.joined]


def test_rows_are_counted_padded_to_the_longest_context() -> None:
    assert padded_kv_bytes(KvShape(PER_TOKEN), [10, 300, 50]) == PER_TOKEN * 300 * 3
    assert padded_kv_bytes(KvShape(PER_TOKEN), []) == 0


def test_a_context_that_could_never_fit_fails_at_once_naming_max_tokens() -> None:
    sched, run = scheduler(WEIGHTS + PER_TOKEN * 300)
    sched.add(ticket("huge", 5000))
    fill(sched, run)
    error = run.ended["huge"]
    assert isinstance(error, ExceedsMemoryBudget) and error.param == "max_tokens"
    assert not sched.line and not joined(run)


def test_a_row_that_does_not_fit_beside_the_batch_waits_and_stops_the_line() -> None:
    sched, run = scheduler(WEIGHTS + PER_TOKEN * 450)
    for job_id, max_tokens in (("a", 97), ("long", 297), ("short", 2)):  # contexts 100, 300, 5
        sched.add(ticket(job_id, max_tokens))
    fill(sched, run)
    # "short" would fit beside "a"; it waits its turn behind "long", which fits only alone.
    assert joined(run) == ["a"]
    assert [t.job_id for t in sched.line] == ["long", "short"]
    assert sched.waiting_for_room and not sched.has_room(held=0, arriving=0)
    assert sched.ledger.kv_bytes == PER_TOKEN * 100

    leave(sched, "a")
    fill(sched, run)
    assert joined(run) == ["a", "long"]  # alone now; "short" beside it would need 2 x 300 tokens
    assert [t.job_id for t in sched.line] == ["short"]


def test_a_row_that_does_not_fit_an_empty_batch_fails_for_now_with_retry_after() -> None:
    sched, run = scheduler(WEIGHTS + PER_TOKEN * 450)
    sched.ledger.hold_weights("other", PER_TOKEN * 400)  # another model, not evictable here
    sched.add(ticket("a", 97))
    fill(sched, run)
    error = run.ended["a"]
    assert isinstance(error, InsufficientMemory) and not isinstance(error, ExceedsMemoryBudget)
    assert error.retry_after_s == 15


def test_kept_prefixes_give_way_to_the_running_batch() -> None:
    sched, run = scheduler(WEIGHTS + PER_TOKEN * 400, kept=PER_TOKEN * 350)
    sched.add(ticket("a", 197))
    fill(sched, run)
    assert joined(run) == ["a"]
    assert sched.ledger.kept_bytes == PER_TOKEN * 200
    assert sched.ledger.held_bytes == sched.ledger.budget_bytes


def test_another_models_ticket_waits_until_the_batch_drains() -> None:
    sched, run = scheduler(10**9)
    sched.add(ticket("x1", 5))
    sched.add(ticket("y1", 5, model="y"))
    sched.add(ticket("x2", 5))
    fill(sched, run)
    assert joined(run) == ["x1"]  # first come, first served: x2 does not pass y1
    leave(sched, "x1")
    fill(sched, run)
    assert joined(run) == ["x1", "y1"] and run.closed == 1 and run.opened == 2
    assert sched.batch is not None and sched.batch.model == "y"


def test_canceled_and_late_tickets_end_while_they_wait() -> None:
    sched, run = scheduler(10**9, max_batch=1)
    sched.add(ticket("running", 5))
    sched.add(ticket("canceled", 5, stop=lambda: "canceled"))
    sched.add(ticket("late", 5, stop=lambda: "timeout"))
    sched.add(ticket("patient", 5))
    fill(sched, run)
    assert joined(run) == ["running"]
    assert isinstance(run.ended["canceled"], GenerationCanceled)
    assert isinstance(run.ended["late"], JobTimedOut)
    assert [t.job_id for t in sched.line] == ["patient"]


def test_a_ticket_canceled_while_another_loads_its_model_is_not_prepared() -> None:
    sched, run = scheduler(10**9)
    canceled = False
    execute = run.execute

    def slow_execute(out: SchedulerOutput) -> StepResult:
        nonlocal canceled
        canceled = canceled or bool(out.prepare)  # the second is canceled while the first one's model loads
        return execute(out)

    run.execute = slow_execute  # type: ignore[method-assign]
    sched.add(ticket("a", 5))
    sched.add(ticket("b", 5, stop=lambda: "canceled" if canceled else None))
    fill(sched, run)
    assert joined(run) == ["a"] and isinstance(run.ended["b"], GenerationCanceled)
    assert run.prepared == ["a"]


def test_a_child_waits_for_the_member_computing_its_prefix_and_lets_others_by() -> None:
    sched, run = scheduler(10**9)
    shared = list(range(100))
    run.prompts = {"first": shared + [1000], "second": shared + [2000], "other": [7, 8, 9]}
    for job_id in ("first", "second", "other"):
        sched.add(ticket(job_id, 5))
    fill(sched, run)
    assert joined(run) == ["first", "other"]  # "second" waits: its prefix is being computed
    assert [t.job_id for t in sched.line] == ["second"]
    assert sched.has_room(held=0, arriving=0)  # waiting for a prefix is not waiting for room

    first = member(sched, "first")
    sched.update_from_output(StepResult(in_cache={first: 101}, prefilled=[first]))
    fill(sched, run)
    assert run.joined[-1] == ("second", Seed(source=first, tokens=100))


def test_a_short_shared_prefix_is_not_worth_waiting_for() -> None:
    sched, run = scheduler(10**9)
    shared = list(range(40))
    run.prompts = {"first": shared + [1], "second": shared + list(range(500, 600))}
    sched.add(ticket("first", 5))
    sched.add(ticket("second", 5))
    fill(sched, run)
    assert run.joined == [("first", Seed()), ("second", Seed())]


def test_a_short_shared_opening_already_computed_is_copied_not_computed_again() -> None:
    """Requests arriving together that begin alike (a chat template's opening and the same first
    words): the later ones copy what a member has computed of it, however short, and never wait."""
    sched, run = scheduler(10**9)
    opening = list(range(20))
    run.prompts = {f"r{i}": opening + list(range(100 * i, 100 * i + 30)) for i in range(1, 4)}
    sched.add(ticket("r1", 5))
    fill(sched, run)
    sched.add(ticket("r2", 5))
    fill(sched, run)  # r1 has computed nothing yet: r2 starts on its own rather than wait
    assert run.joined == [("r1", Seed()), ("r2", Seed())]
    r1 = member(sched, "r1")
    sched.update_from_output(StepResult(in_cache={r1: 25}))  # r1's prefill is past the opening, not yet done
    sched.add(ticket("r3", 5))
    fill(sched, run)
    assert run.joined[-1] == ("r3", Seed(source=r1, tokens=20))
    # Long past the opening (a long generation): its whole cache would be copied for 20 tokens.
    sched.update_from_output(StepResult(in_cache={r1: 20 + COPY_SLACK_TOKENS + 1}))
    sched.add(ticket("r4", 5))
    run.prompts["r4"] = opening + [9]
    fill(sched, run)
    assert run.joined[-1] == ("r4", Seed())


def test_no_ticket_waits_for_a_prefix_it_could_not_then_copy() -> None:
    """A member whose own prompt reaches far past the shared part is never copied from (its whole
    cache would be): waiting for it to compute that part would only delay a prompt computed anyway."""
    sched, run = scheduler(10**9)
    shared = list(range(100))
    run.prompts = {"long": shared + list(range(1000, 1000 + COPY_SLACK_TOKENS + 1)), "short": shared + [7]}
    sched.add(ticket("long", 5))
    sched.add(ticket("short", 5))
    fill(sched, run)
    assert run.joined == [("long", Seed()), ("short", Seed())]


def test_caches_that_cannot_be_cut_start_from_kept_states_never_from_a_member() -> None:
    """A recurrent state or a wrapped window cannot be cut back to a shared part: the second waits for
    no member and copies none, and both look for kept states."""
    sched, run = scheduler(10**9)
    run.shareable = False
    run.prompts = {"first": list(range(100)), "second": list(range(100))}
    sched.add(ticket("first", 5))
    sched.add(ticket("second", 5))
    fill(sched, run)
    assert run.joined == [("first", Seed()), ("second", Seed())]


def test_memory_past_its_thresholds_lowers_the_batch_limit() -> None:
    sched, _ = scheduler(10**9)
    sched.limit_batch(50.0)
    assert sched.batch_limit == 16 and sched.has_room(held=0, arriving=0)
    sched.limit_batch(90.0)  # warning, nothing running: no one new beyond one row
    assert sched.batch_limit == 1
    sched.limit_batch(96.0)  # critical
    assert sched.batch_limit == 1
    sched.limit_batch(50.0)
    assert sched.batch_limit == 16


def test_under_pressure_a_leaving_row_is_not_replaced() -> None:
    sched, run = scheduler(10**9)
    for i in range(6):
        sched.add(ticket(f"r{i}", 5))
    fill(sched, run)
    sched.limit_batch(96.0)  # critical: half of the 6 running
    assert sched.batch_limit == 3
    sched.limit_batch(90.0)  # warning: no one new
    leave(sched, "r0")
    leave(sched, "r1", "r2", "r3")
    assert sched.batch_limit == 2
    sched.add(ticket("new", 5))
    fill(sched, run)
    assert "new" not in joined(run)


def test_the_worker_claims_nothing_past_the_batch_limit() -> None:
    sched, run = scheduler(10**9, max_batch=2)
    assert sched.has_room(held=1, arriving=0)
    assert not sched.has_room(held=2, arriving=0)
    assert not sched.has_room(held=0, arriving=2)
    sched.add(ticket("a", 5))
    fill(sched, run)
    assert sched.has_room(held=1, arriving=0) and not sched.has_room(held=1, arriving=1)


@pytest.mark.parametrize("model", ["m", "other"])
def test_a_batch_that_closes_makes_waiting_tickets_forget_their_sharers(model: str) -> None:
    sched, run = scheduler(10**9)
    run.prompts = {"first": list(range(100)) + [1], "second": list(range(100)) + [2]}
    sched.add(ticket("first", 5))
    sched.add(ticket("second", 5, model=model))
    fill(sched, run)
    first = member(sched, "first")
    sched.update_from_output(StepResult(ended=[first], closed=True))  # drained: the runner closed it
    assert sched.batch is None
    assert all(t.sharer is None for t in sched.line)
    assert sched.ledger.kv_bytes == 0


def test_the_scheduler_and_the_ledger_import_no_mlx() -> None:
    import subprocess
    import sys

    imported = "import sys, worker.scheduler, worker.tickets, worker.ledger"
    code = f"{imported}; print(sorted(m for m in sys.modules if m.startswith('mlx')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_prefix_held_now_is_copied_when_the_longest_sharer_cannot_be() -> None:
    """The member sharing most with a prompt may have computed too little of it (and a short part
    is not worth waiting for) or be too far past it to copy from: the longest start another member
    holds now is copied instead, and the most the longest sharer holds already counts too."""
    sched, run = scheduler(10**9)
    opening, longer = list(range(20)), list(range(20, 40))
    run.prompts = {
        "holder": opening + [500, 501],
        "sharer": opening + longer + [600],
        "asker": opening + longer + [700, 701] + list(range(800, 850)),
    }
    sched.add(ticket("holder", 5))
    sched.add(ticket("sharer", 5))
    fill(sched, run)
    holder, longest = member(sched, "holder"), member(sched, "sharer")
    sched.update_from_output(StepResult(in_cache={holder: 22, longest: 10}))  # the sharer's prefill is under way
    sched.add(ticket("asker", 5))
    fill(sched, run)
    assert run.joined[-1] == ("asker", Seed(source=holder, tokens=20))  # not worth waiting for 40 of 92
    sched.update_from_output(StepResult(in_cache={longest: 30}))
    sched.add(ticket("again", 5))
    run.prompts["again"] = opening + longer + list(range(900, 960))
    fill(sched, run)
    assert run.joined[-1] == ("again", Seed(source=longest, tokens=30))
