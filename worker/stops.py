"""Stop strings: find the first one in generated text, and how much text is safe to emit.

Text that could still turn into a stop string is held back, so a stream never
shows a client the start of a stop sequence it will then not receive in full.
"""

from __future__ import annotations


class StopMatcher:
    """Matches a fixed set of stop strings against growing text."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self.stops = list(self._stops)
        self._longest = max((len(s) for s in self._stops), default=0)

    def find(self, text: str, start: int = 0) -> int | None:
        """Index of the earliest stop string in `text` at or after `start`, or None."""
        if not self._stops:
            return None
        # A stop string that completes now may have begun a little before `start`.
        begin = max(0, start - self._longest + 1)
        hits = [i for i in (text.find(s, begin) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def safe_length(self, text: str) -> int:
        """Length of the prefix of `text` that no stop string can still claim."""
        held = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    held = max(held, size)
                    break
        return len(text) - held
