"""How many prompt tokens the next piece of prefill takes: sized by time, from this worker's own turns.

A prompt joining a running batch is prefilled in pieces between decode steps
(mlx-lm's BatchGenerator takes `prefill_step_size` tokens of it per step, and
reads that attribute at every step). A fixed count of tokens is the wrong unit:
256 tokens take 50 ms on a GPU and 5 s on a laptop's CPU, so a count that keeps
streams smooth on one machine stalls them for seconds on another.

What a running stream sees is the engine's turns: one token per turn, so its
normal gap is a turn without prefill, and its pause while a prompt is prefilled
beside it is a turn that carries a piece. Both are measured here as the engine's
wall time from one turn's end to the next (everything a stream waits through:
the decode step, the piece, the tokens handed out, the loop between turns), and
a piece is sized so that its turn takes `pause_steps` normal turns. The turn's
time beside the piece (the decode step, and whatever the piece costs however few
its tokens) is measured too, as what a turn with a piece took beyond its tokens
at the measured prefill rate; that rate is the piece's own time, the wait for the
step it shares a stream with included, so it errs slow, and a slow rate only
makes the next piece smaller. Recent medians, not means: a turn that also encoded
a long arriving prompt or probed memory must not size the pieces after it. Other
work beside the batch (a flood of vectors) is sized by the first quartile of the
recent turns instead: once it runs beside every turn no normal turn is measured
until it ends, so a median taken while half of the recent turns were slowed (the
flood's own arrival taking the cores) would size all of it.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

KEEP = 0.7
"""Weight of the prefill rate measured so far against a new piece (a running mean weighted by time)."""

RECENT = 15
"""Turns a median is taken over: the batch's rhythm as it is now, outliers left out."""

MIN_TOKENS = 8
"""The smallest piece: below it the per-piece cost (an evaluation, a cache clear) dominates."""

FIRST_TOKENS = 64
"""A piece before any prefill was measured: small, so that its measurement comes soon."""

MAX_PADDING = 1 / 3
"""The share of a piece's computed positions that may be padding (see `unpadded`)."""


def undisturbed(turns: Sequence[float]) -> float:
    """A normal turn's time among recent `turns`: their first quartile (see the module's notes)."""
    return sorted(turns)[len(turns) // 4]


@dataclass
class PrefillPace:
    """The next piece's size (per row) from the measured turns and prefill rate."""

    pause_steps: float
    """A turn carrying a piece takes at most this many normal turns: the longest pause a running
    stream sees, in its own normal gaps (MLXQ_PREFILL_PAUSE_STEPS)."""
    max_tokens: int
    """The most prompt tokens one piece takes, all of its rows together (MLXQ_PREFILL_STEP_SIZE)."""
    alone_s: float = 1.0
    """A piece's time while no row decodes: no stream waits on it, but a new arrival waits to join
    and the watchdog waits for a sign of life, both between pieces."""
    _gaps: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    _steps: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    _beside: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    _tokens: float = 0.0
    _seconds: float = 0.0
    _after_piece: bool = False
    _model: str = ""

    @property
    def rate(self) -> float | None:
        """Prompt tokens prefilled per second (all rows of a piece together); None before any."""
        return self._tokens / self._seconds if self._seconds > 0 else None

    @property
    def gap_s(self) -> float | None:
        """A normal turn's time while rows decode (a stream's gap between two tokens); None before any.
        Until a turn without prefill is measured (rows that began decoding while others still prefill,
        every turn carrying a piece), the decode steps of the turns with pieces stand in for it."""
        if self._gaps:
            return statistics.median(self._gaps)
        return statistics.median(self._steps) if self._steps else None

    @property
    def beside_s(self) -> float | None:
        """What a turn carrying a piece takes beyond the piece's tokens; None before any was measured."""
        return statistics.median(self._beside) if self._beside else None

    def piece(self, decoding: bool, rows: int) -> int:
        """Tokens of each of `rows` prompts the next piece takes, while rows are `decoding` or not;
        `max_tokens` bounds the piece as a whole (its activations grow with all of its rows)."""
        rows = max(1, rows)
        ceiling = max(MIN_TOKENS, self.max_tokens // rows)
        rate, gap = self.rate, self.gap_s
        if rate is None:
            return min(ceiling, FIRST_TOKENS)
        if not decoding or gap is None:
            budget_s = self.alone_s
        else:
            beside = self.beside_s
            budget_s = self.pause_steps * gap - (gap if beside is None else beside)
        return max(MIN_TOKENS, min(ceiling, round(rate * budget_s / rows)))

    def other_work_s(self) -> float:
        """The time other work than the batch's (a batch of vectors) may take in a turn while rows decode:
        the turn, a normal one and that work, stays within `pause_steps` normal turns; 0 before a normal
        turn was measured. The normal turn here is the first quartile of the recent ones (see the module's
        notes)."""
        gap = undisturbed(self._gaps) if self._gaps else self.gap_s
        return 0.0 if gap is None else (self.pause_steps - 1) * gap

    def measured(self, prompt_tokens: int, prompt_s: float, steps: int, decode_s: float, turn_s: float | None) -> None:
        """What one turn of the generator did: `prompt_tokens` prefilled in `prompt_s` and `steps`
        decode steps in `decode_s`, in `turn_s` from the previous turn's end (None for a batch's
        first turn).

        A decode step is evaluated asynchronously, while the turn after it runs: so the first turn
        after a piece finds its step computed during the piece, and is no measure of a normal one."""
        if prompt_tokens > 0:
            if steps > 0 and decode_s > 0:
                self._steps.append(decode_s / steps)
            if prompt_s > 0:
                self._tokens = KEEP * self._tokens + prompt_tokens
                self._seconds = KEEP * self._seconds + prompt_s
            rate = self.rate
            if steps > 0 and turn_s is not None and rate is not None:
                self._beside.append(max(0.0, turn_s - prompt_tokens / rate))
            self._after_piece = True
        elif steps > 0 and turn_s is not None:
            if self._after_piece:
                self._after_piece = False
                return
            self._gaps.append(turn_s)

    def beside_batch(self) -> None:
        """The engine did other work than the batch's in this turn (a batch of vectors): the turn it lengthened,
        measured at the next step, is no measure of a normal one, as after a piece. Other work is sized by
        the gap: counted in it, each next batch would grow; less the work's own time, the turn would count
        the decode step computed meanwhile as nothing."""
        self._after_piece = True

    def serving(self, model: str) -> None:
        """The batch about to open runs `model`: measurements of another model are forgotten."""
        if model != self._model:
            self.reset()
            self._model = model

    def reset(self) -> None:
        """Forget what was measured: another model prefills and decodes at rates of its own."""
        self._gaps.clear()
        self._steps.clear()
        self._beside.clear()
        self._tokens, self._seconds, self._after_piece = 0.0, 0.0, False


def unpadded(piece: int, remaining: Sequence[int]) -> int:
    """The piece each prefilling row takes, at most `piece`, given the prompt tokens each of them has
    left: mlx-lm pads every row of a piece to its longest, so beside a long prompt a short one's
    last piece is computed as long as the long one's. The largest piece of which at most
    MAX_PADDING is padding (the shortest row's length pads nothing), and no less than MIN_TOKENS:
    a row with a token or two left is not worth a turn of its own."""
    lefts = [left for left in remaining if left > 0]
    for candidate in sorted({min(left, piece) for left in lefts}, reverse=True):
        real = sum(min(left, candidate) for left in lefts)
        if len(lefts) * candidate - real <= MAX_PADDING * len(lefts) * candidate:
            return max(candidate, min(piece, MIN_TOKENS))
    return piece
