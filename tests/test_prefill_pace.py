"""Prefill pieces sized by time (worker/prefill_pace.py), with plain numbers."""

from __future__ import annotations

from worker.prefill_pace import FIRST_TOKENS, MIN_TOKENS, PrefillPace


def test_before_any_measurement_a_piece_is_small() -> None:
    assert PrefillPace(pause_steps=3, max_tokens=2048).piece(decoding=True, rows=1) == FIRST_TOKENS
    assert PrefillPace(pause_steps=3, max_tokens=32).piece(decoding=False, rows=1) == 32


def test_a_piece_beside_decoding_rows_takes_the_set_share_of_their_step() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    pace.measured(prompt_tokens=1000, prompt_s=1.0, steps=0, decode_s=0.0)  # 1,000 tokens a second
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.05)  # a 50 ms step
    assert pace.piece(decoding=True, rows=1) == 150  # 3 steps of 50 ms at 1,000 tokens/s
    assert pace.piece(decoding=True, rows=3) == 50  # the piece's time is shared by its rows
    assert pace.piece(decoding=False, rows=1) == 1000  # nobody waits: a second's worth


def test_the_same_pause_is_a_few_tokens_on_a_slow_machine_and_many_on_a_fast_one() -> None:
    slow, fast = PrefillPace(pause_steps=3, max_tokens=2048), PrefillPace(pause_steps=3, max_tokens=2048)
    slow.measured(prompt_tokens=256, prompt_s=4.0, steps=1, decode_s=0.08)  # a 2-core CPU
    fast.measured(prompt_tokens=256, prompt_s=0.05, steps=1, decode_s=0.012)  # a GPU
    assert slow.piece(decoding=True, rows=1) == 15  # 64 tokens/s x 0.24 s
    assert slow.piece(decoding=True, rows=4) == MIN_TOKENS  # and never less than the smallest piece
    assert fast.piece(decoding=True, rows=1) == 184  # 5,120 tokens/s x 36 ms
    assert fast.piece(decoding=False, rows=1) == 2048  # the ceiling


def test_the_rates_follow_the_machine_as_it_changes() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=100_000)
    pace.measured(prompt_tokens=1000, prompt_s=1.0, steps=10, decode_s=0.5)
    before = pace.piece(decoding=True, rows=1)
    for _ in range(40):  # the machine got four times slower at both
        pace.measured(prompt_tokens=250, prompt_s=1.0, steps=10, decode_s=2.0)
    assert pace.rate is not None and abs(pace.rate - 250) < 1
    assert pace.step_s is not None and abs(pace.step_s - 0.2) < 0.001
    assert before == 150
    assert abs(pace.piece(decoding=True, rows=1) - before) <= 1  # slower steps, slower prefill: same share
