"""Prefill pieces sized by time (worker/prefill_pace.py), with plain numbers."""

from __future__ import annotations

from worker.prefill_pace import FIRST_TOKENS, MIN_TOKENS, PrefillPace


def run(pace: PrefillPace, tokens_per_s: float, step_s: float) -> None:
    """A second of prefill alone, then decode steps alone (the first after a piece is no measure)."""
    pace.measured(prompt_tokens=round(tokens_per_s), prompt_s=1.0, steps=0, decode_s=0.0)
    for _ in range(2):
        pace.measured(prompt_tokens=0, prompt_s=0.0, steps=10, decode_s=10 * step_s)


def test_before_any_measurement_a_piece_is_small() -> None:
    assert PrefillPace(pause_steps=3, max_tokens=2048).piece(decoding=True, rows=1) == FIRST_TOKENS
    assert PrefillPace(pause_steps=3, max_tokens=32).piece(decoding=False, rows=1) == 32


def test_a_piece_beside_decoding_rows_takes_the_set_share_of_their_step() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    run(pace, tokens_per_s=1000, step_s=0.05)
    assert pace.piece(decoding=True, rows=1) == 150  # 3 steps of 50 ms at 1,000 tokens/s
    assert pace.piece(decoding=True, rows=3) == 50  # the piece's time is shared by its rows
    assert pace.piece(decoding=False, rows=1) == 1000  # nobody waits: a second's worth


def test_the_same_pause_is_a_few_tokens_on_a_slow_machine_and_many_on_a_fast_one() -> None:
    slow, fast = PrefillPace(pause_steps=3, max_tokens=2048), PrefillPace(pause_steps=3, max_tokens=2048)
    run(slow, tokens_per_s=64, step_s=0.08)  # a 2-core CPU
    run(fast, tokens_per_s=5120, step_s=0.012)  # a GPU
    assert slow.piece(decoding=True, rows=1) == 15  # 64 tokens/s x 0.24 s
    assert slow.piece(decoding=True, rows=4) == MIN_TOKENS  # and never less than the smallest piece
    assert fast.piece(decoding=True, rows=1) == 184  # 5,120 tokens/s x 36 ms
    assert fast.piece(decoding=False, rows=1) == 2048  # the ceiling


def test_the_rates_follow_the_machine_as_it_changes() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=100_000)
    run(pace, tokens_per_s=1000, step_s=0.05)
    before = pace.piece(decoding=True, rows=1)
    for _ in range(40):  # the machine got four times slower at both
        run(pace, tokens_per_s=250, step_s=0.2)
    assert pace.rate is not None and abs(pace.rate - 250) < 1
    assert pace.step_s is not None and abs(pace.step_s - 0.2) < 0.001
    assert before == 150
    assert abs(pace.piece(decoding=True, rows=1) - before) <= 1  # slower steps, slower prefill: same share


def test_a_piece_beside_a_step_is_measured_without_that_step() -> None:
    """A piece's evaluation waits for the decode step launched before it, and the step after a piece
    finds its work done: neither may make the rates look slower or the steps shorter than they are."""
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.1)
    pace.measured(prompt_tokens=100, prompt_s=0.2, steps=1, decode_s=0.1)  # 0.1 s of it is the step
    assert pace.rate == 1000
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.001)  # computed during the piece
    assert pace.step_s == 0.1
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.1)
    assert pace.step_s == 0.1


def test_the_ceiling_bounds_a_piece_with_all_of_its_rows() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=2048)
    pace.measured(prompt_tokens=100_000, prompt_s=1.0, steps=0, decode_s=0.0)
    assert pace.piece(decoding=False, rows=1) == 2048
    assert pace.piece(decoding=False, rows=8) == 256


def test_another_model_starts_from_nothing_measured() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=2048)
    pace.measured(prompt_tokens=100_000, prompt_s=1.0, steps=1, decode_s=0.01)
    pace.reset()
    assert (pace.rate, pace.step_s) == (None, None)
    assert pace.piece(decoding=True, rows=1) == FIRST_TOKENS
