"""When a dead or hung worker may start again: exponential backoff and a rate limit."""

from __future__ import annotations

from collections import deque

from shared.settings import Settings


class RestartPolicy:
    """delay = min(base * 2^n, max) for the n-th consecutive failure (n from 0), and at most
    `restart_limit` restarts in any `restart_window_s`."""

    def __init__(self, settings: Settings) -> None:
        self.base_s = settings.restart_backoff_base_s
        self.max_s = settings.restart_backoff_max_s
        self.limit = settings.restart_limit
        self.window_s = settings.restart_window_s
        self._restarts: deque[float] = deque()

    def delay(self, consecutive_failures: int) -> float:
        n = max(0, consecutive_failures - 1)
        return float(min(self.base_s * 2**n, self.max_s))

    def earliest(self, wanted: float) -> float:
        """The first time at or after `wanted` that a restart fits in the rate limit."""
        while self._restarts and self._restarts[0] <= wanted - self.window_s:
            self._restarts.popleft()
        if len(self._restarts) < self.limit:
            return wanted
        return self._restarts[len(self._restarts) - self.limit] + self.window_s

    def record(self, at: float) -> None:
        self._restarts.append(at)
