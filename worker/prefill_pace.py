"""How many prompt tokens the next piece of prefill takes: sized by time, from this worker's own rates.

A prompt joining a running batch is prefilled in pieces between decode steps
(mlx-lm's BatchGenerator takes `prefill_step_size` tokens of it per step, and
reads that attribute at every step). A fixed count of tokens is the wrong unit:
256 tokens take 50 ms on a GPU and 5 s on a laptop's CPU, so a count that keeps
streams smooth on one machine stalls them for seconds on another. Here a piece
takes at most `pause_steps` decode steps' worth of time, so a running stream's
longest pause stays near `pause_steps + 1` of its normal gaps on any machine
(measured on a 2-core CPU as the longest time no stream got anything: 5.3 gaps at 2.5 and 4.2 at 2,
since a turn also carries the decode step and each row's own work; hence the default of 2).
Both rates are running means of what this worker measured (the generator's own
counters), so they follow the machine, the model and the batch as they change.
"""

from __future__ import annotations

from dataclasses import dataclass

KEEP = 0.7
"""Weight of the prefill rate measured so far against a new piece (a running mean weighted by time)."""

STEP_KEEP = 0.8
"""Weight of the decode step's time measured so far against a new step."""

MIN_TOKENS = 8
"""The smallest piece: below it the per-piece cost (an evaluation, a cache clear) dominates."""

FIRST_TOKENS = 64
"""A piece before any prefill was measured: small, so that its measurement comes soon."""


@dataclass
class PrefillPace:
    """The next piece's size (per row) from the measured decode step and prefill rate."""

    pause_steps: float
    """A piece takes at most this many decode steps' time (MLXQ_PREFILL_PAUSE_STEPS)."""
    max_tokens: int
    """The most prompt tokens one piece takes, all of its rows together (MLXQ_PREFILL_STEP_SIZE)."""
    alone_s: float = 1.0
    """A piece's time while no row decodes: no stream waits on it, but a new arrival waits to join
    and the watchdog waits for a sign of life, both between pieces."""
    step_s: float | None = None
    """The running mean of a decode step's time."""
    _tokens: float = 0.0
    _seconds: float = 0.0
    _after_piece: bool = False
    _model: str = ""

    @property
    def rate(self) -> float | None:
        """Prompt tokens prefilled per second (all rows of a piece together); None before any."""
        return self._tokens / self._seconds if self._seconds > 0 else None

    def piece(self, decoding: bool, rows: int) -> int:
        """Tokens of each of `rows` prompts the next piece takes, while rows are `decoding` or not;
        `max_tokens` bounds the piece as a whole (its activations grow with all of its rows)."""
        rows = max(1, rows)
        ceiling = max(MIN_TOKENS, self.max_tokens // rows)
        rate = self.rate
        if rate is None:
            return min(ceiling, FIRST_TOKENS)
        budget_s = self.pause_steps * self.step_s if decoding and self.step_s is not None else self.alone_s
        return max(MIN_TOKENS, min(ceiling, int(rate * budget_s / rows)))

    def measured(self, prompt_tokens: int, prompt_s: float, steps: int, decode_s: float) -> None:
        """What one turn of the generator did: a piece of prefill, decode steps, or both.

        A decode step is evaluated asynchronously: a turn waits for the step before, while the next
        one is computed. So a piece's evaluation also waits for the step launched just before it
        (that step's time is taken off the piece's), and the first step after a piece finds its
        work done already (its time is no measure of a step)."""
        if prompt_tokens > 0:
            piece_s = prompt_s - (self.step_s or 0.0 if steps > 0 else 0.0)
            if piece_s > 0:
                self._tokens = KEEP * self._tokens + prompt_tokens
                self._seconds = KEEP * self._seconds + piece_s
            self._after_piece = True
        elif steps > 0 and decode_s > 0:
            if self._after_piece:
                self._after_piece = False
                return
            step = decode_s / steps
            self.step_s = step if self.step_s is None else STEP_KEEP * self.step_s + (1 - STEP_KEEP) * step

    def serving(self, model: str) -> None:
        """The batch about to open runs `model`: measurements of another model are forgotten."""
        if model != self._model:
            self.reset()
            self._model = model

    def reset(self) -> None:
        """Forget what was measured: another model prefills and decodes at rates of its own."""
        self.step_s, self._tokens, self._seconds, self._after_piece = None, 0.0, 0.0, False
