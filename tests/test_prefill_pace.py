"""Prefill pieces sized by time (worker/prefill_pace.py), with plain numbers."""

from __future__ import annotations

from worker.prefill_pace import FIRST_TOKENS, MIN_TOKENS, PrefillPace, unpadded


def run(pace: PrefillPace, tokens_per_s: float, gap_s: float) -> None:
    """A second of prefill alone, then turns that only decode (the first after a piece is no measure)."""
    pace.measured(prompt_tokens=round(tokens_per_s), prompt_s=1.0, steps=0, decode_s=0.0, turn_s=None)
    for _ in range(20):
        pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=gap_s)


def test_before_any_measurement_a_piece_is_small() -> None:
    assert PrefillPace(pause_steps=3, max_tokens=2048).piece(decoding=True, rows=1) == FIRST_TOKENS
    assert PrefillPace(pause_steps=3, max_tokens=32).piece(decoding=False, rows=1) == 32


def test_a_turn_with_a_piece_takes_the_set_number_of_normal_turns() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    run(pace, tokens_per_s=1000, gap_s=0.05)
    # Until a turn with a piece is measured, the turn is taken to carry one normal turn beside it.
    assert pace.piece(decoding=True, rows=1) == 100  # (3 - 1) turns of 50 ms at 1,000 tokens/s
    assert pace.piece(decoding=True, rows=3) == 33  # the piece's time is shared by its rows
    assert pace.piece(decoding=False, rows=1) == 1000  # nobody waits: a second's worth
    # Turns with 100-token pieces took 0.2 s: 0.1 s of the prefill, 0.1 s beside it (the step and
    # whatever a piece costs however small), which the next pieces leave room for.
    for _ in range(3):
        pace.measured(prompt_tokens=100, prompt_s=0.1, steps=1, decode_s=0.0, turn_s=0.2)
    assert pace.beside_s is not None and abs(pace.beside_s - 0.1) < 1e-9
    assert pace.piece(decoding=True, rows=1) == 50  # 3 x 50 ms - 100 ms, at 1,000 tokens/s


def test_the_same_pause_is_a_few_tokens_on_a_slow_machine_and_many_on_a_fast_one() -> None:
    slow, fast = PrefillPace(pause_steps=4, max_tokens=2048), PrefillPace(pause_steps=4, max_tokens=2048)
    run(slow, tokens_per_s=64, gap_s=0.08)  # a 2-core CPU
    run(fast, tokens_per_s=5120, gap_s=0.012)  # a GPU
    assert slow.piece(decoding=True, rows=1) == 15  # 64 tokens/s x 0.24 s
    assert slow.piece(decoding=True, rows=4) == MIN_TOKENS  # and never less than the smallest piece
    assert fast.piece(decoding=True, rows=1) == 184  # 5,120 tokens/s x 36 ms
    assert fast.piece(decoding=False, rows=1) == 2048  # the ceiling


def test_the_rates_follow_the_machine_as_it_changes() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=100_000)
    run(pace, tokens_per_s=1000, gap_s=0.05)
    before = pace.piece(decoding=True, rows=1)
    for _ in range(40):  # the machine got four times slower at both
        run(pace, tokens_per_s=250, gap_s=0.2)
    assert pace.rate is not None and abs(pace.rate - 250) < 1
    assert pace.gap_s == 0.2
    assert before == 100
    assert abs(pace.piece(decoding=True, rows=1) - before) <= 1  # slower turns, slower prefill: same share


def test_the_turn_after_a_piece_is_no_measure_of_a_normal_one() -> None:
    """A decode step is evaluated while the next turn runs: the one launched beside a piece is
    computed during it, and the turn after finds its work done."""
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=0.1)
    pace.measured(prompt_tokens=100, prompt_s=0.2, steps=1, decode_s=0.0, turn_s=0.3)
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=0.001)
    assert pace.gap_s == 0.1
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=0.1)
    assert pace.gap_s == 0.1


def test_a_turn_that_also_did_something_slow_does_not_size_the_pieces_after_it() -> None:
    """A turn may also have encoded a long arriving prompt or probed memory: medians leave it out."""
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    run(pace, tokens_per_s=1000, gap_s=0.05)
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=5.0)
    for _ in range(3):
        pace.measured(prompt_tokens=100, prompt_s=0.1, steps=1, decode_s=0.0, turn_s=0.2)
    pace.measured(prompt_tokens=100, prompt_s=0.1, steps=1, decode_s=0.0, turn_s=8.0)
    assert pace.gap_s == 0.05
    assert pace.piece(decoding=True, rows=1) == 50


def test_turns_slowed_by_a_flood_s_arrival_do_not_size_the_work_beside_them() -> None:
    """Nine of fifteen turns slowed tenfold (the flood's own arrival taking the cores), then other work beside
    every turn, so no normal one is measured: that work's budget is still the normal turns'."""
    pace = PrefillPace(pause_steps=4, max_tokens=4096)
    run(pace, tokens_per_s=1000, gap_s=0.007)
    for _ in range(9):
        pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=0.07)
    assert abs(pace.other_work_s() - 3 * 0.007) < 1e-9


def test_the_first_turn_of_a_batch_measures_no_gap() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=None)
    pace.measured(prompt_tokens=100, prompt_s=0.1, steps=1, decode_s=0.0, turn_s=None)
    assert (pace.gap_s, pace.beside_s) == (None, None)


def test_rows_that_began_decoding_while_others_prefill_pause_for_a_share_of_their_step() -> None:
    """The first prompts of a burst are prefilled, begin decoding, and the rest are prefilled beside
    them: every turn carries a piece, so no turn without one is measured, and the decode steps of
    those turns stand in for a stream's gap (not the second a piece takes while nobody decodes)."""
    pace = PrefillPace(pause_steps=3, max_tokens=4096)
    pace.measured(prompt_tokens=1000, prompt_s=1.0, steps=0, decode_s=0.0, turn_s=None)
    pace.measured(prompt_tokens=1000, prompt_s=1.0, steps=0, decode_s=0.0, turn_s=1.0)
    assert pace.piece(decoding=False, rows=1) == 1000
    pace.measured(prompt_tokens=1000, prompt_s=1.0, steps=1, decode_s=0.05, turn_s=1.05)
    assert pace.gap_s == 0.05
    assert pace.piece(decoding=True, rows=1) == 100  # 3 x 50 ms, less the 50 ms beside the piece
    pace.measured(prompt_tokens=100, prompt_s=0.1, steps=1, decode_s=0.05, turn_s=0.15)
    assert pace.piece(decoding=True, rows=1) == 100


def test_the_ceiling_bounds_a_piece_with_all_of_its_rows() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=2048)
    pace.measured(prompt_tokens=100_000, prompt_s=1.0, steps=0, decode_s=0.0, turn_s=None)
    assert pace.piece(decoding=False, rows=1) == 2048
    assert pace.piece(decoding=False, rows=8) == 256


def test_another_model_starts_from_nothing_measured() -> None:
    pace = PrefillPace(pause_steps=3, max_tokens=2048)
    run(pace, tokens_per_s=100_000, gap_s=0.01)
    pace.measured(prompt_tokens=100, prompt_s=0.01, steps=1, decode_s=0.0, turn_s=0.02)
    pace.reset()
    assert (pace.rate, pace.gap_s, pace.beside_s) == (None, None, None)
    assert pace.piece(decoding=True, rows=1) == FIRST_TOKENS


def padding(piece: int, remaining: list[int]) -> float:
    """The share of a piece's computed positions that are padding: every row is padded to the longest."""
    taken = [min(left, piece) for left in remaining if left > 0]
    return 1 - sum(taken) / (len(taken) * max(taken))


def test_short_prompts_beside_a_long_one_take_a_piece_of_their_own_length() -> None:
    # Seven chats of 50 tokens beside a 4,000-token document: 256 tokens each would compute 1,442
    # positions of padding beside 606 of prompt; 50 each computes none, and they are done.
    remaining = [4000, 50, 50, 50, 50, 50, 50, 50]
    assert padding(256, remaining) > 0.7
    assert unpadded(256, remaining) == 50
    assert unpadded(256, [4000]) == 256  # alone, the long one takes the whole piece again


def test_padding_stays_under_a_third_of_what_a_piece_computes() -> None:
    assert unpadded(256, [300, 280, 400]) == 256  # all longer than the piece: nothing is padded
    assert unpadded(256, [60, 70, 64]) == 70  # the piece covers them all: the longest pads the rest
    assert unpadded(256, [4000, 200]) == 256  # 56 positions of 512: it is worth the long one's progress
    assert unpadded(256, [4000, 3000, 20]) == 256  # one short row of three wastes under a third
    assert unpadded(256, [4000, 20]) == 20
    for remaining in ([4000, 50, 120, 900, 8], [9, 13, 500, 500, 500, 500], [1000, 30, 30, 30]):
        piece = unpadded(256, remaining)
        assert padding(piece, remaining) <= 1 / 3, (remaining, piece)


def test_a_row_with_a_token_or_two_left_is_cut_no_shorter_than_the_smallest_piece() -> None:
    assert unpadded(256, [4000, 1]) == MIN_TOKENS
    assert unpadded(4, [4000, 1]) == 4


def test_rows_done_with_their_prompts_pad_nothing() -> None:
    assert unpadded(256, [0, 4000]) == 256  # a row whose prompt is in: it decodes next
    assert unpadded(256, []) == 256


def test_other_work_beside_a_turn_is_sized_by_the_normal_turn_and_not_counted_in_it() -> None:
    """A batch of vectors between decode steps may take what keeps its turn within the pause; the turn it
    lengthened is measured without it, or each next batch would be sized by the one before."""
    pace = PrefillPace(pause_steps=3.5, max_tokens=4096)
    assert pace.other_work_s() == 0.0  # no normal turn measured: the caller takes a small batch
    run(pace, tokens_per_s=1000, gap_s=0.01)
    assert abs(pace.other_work_s() - 0.025) < 1e-9  # 2.5 normal turns beside the normal turn itself
    for _ in range(30):
        pace.beside_batch()
        pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=0.035)
    assert pace.gap_s is not None and abs(pace.gap_s - 0.01) < 1e-9
    assert abs(pace.other_work_s() - 0.025) < 1e-9
    for _ in range(30):  # the batches are done: turns are normal ones again
        pace.measured(prompt_tokens=0, prompt_s=0.0, steps=1, decode_s=0.0, turn_s=0.012)
    assert pace.gap_s is not None and abs(pace.gap_s - 0.012) < 1e-9
