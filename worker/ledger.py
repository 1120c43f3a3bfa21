"""The memory ledger: every byte a worker's budget bounds, in one place.

Three things hold memory under the budget: model weights (loaded, or being
loaded), the running batch's KV cache, and the KV caches of prompt prefixes kept
for reuse. The model cache writes what it loads and unloads, the scheduler what
the batch holds; both ask the ledger whether something more fits. Kept prefixes
are the cheapest memory to give back, so the ledger gives them up first; idle
models go next, by the model cache's one eviction routine.

No MLX here: the ledger is arithmetic, read from the heartbeat thread too.
"""

from __future__ import annotations

import threading
from typing import Protocol


class KeptCaches(Protocol):
    """Prefix caches kept for reuse (worker/kv_manager.py), as the ledger sees them."""

    @property
    def nbytes(self) -> int: ...

    def shrink_to(self, budget_bytes: int) -> None: ...

    def clear(self) -> None: ...


class MemoryLedger:
    """Weights, the running batch's KV cache and kept prefixes, against one byte budget."""

    def __init__(self, budget_bytes: int, kept: KeptCaches) -> None:
        self.budget_bytes = budget_bytes
        self.kept = kept
        self._weights: dict[str, int] = {}
        """Bytes of each model loaded or being loaded, by name."""
        self._kv_bytes = 0
        self._lock = threading.Lock()

    # -- what is written --------------------------------------------------------------

    def hold_weights(self, model: str, nbytes: int) -> None:
        with self._lock:
            self._weights[model] = nbytes

    def drop_weights(self, model: str) -> None:
        """The model's load failed: it holds nothing."""
        with self._lock:
            self._weights.pop(model, None)

    def unloaded(self, model: str) -> None:
        """The model is gone: its weights, and every kept prefix (their KV is no use without it)."""
        self.drop_weights(model)
        self.drop_kept()

    def drop_kept(self) -> None:
        self.kept.clear()

    def hold_kv(self, nbytes: int) -> None:
        """The running batch's KV cache is now `nbytes` (0 once it closes)."""
        self._kv_bytes = nbytes

    # -- what is read -----------------------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        with self._lock:
            return sum(self._weights.values())

    def weights_of(self, model: str) -> int:
        with self._lock:
            return self._weights.get(model, 0)

    @property
    def kv_bytes(self) -> int:
        return self._kv_bytes

    @property
    def kept_bytes(self) -> int:
        return self.kept.nbytes

    @property
    def held_bytes(self) -> int:
        return self.weights_bytes + self._kv_bytes + self.kept_bytes

    def fits(self, more_bytes: int = 0, kv_bytes: int | None = None) -> bool:
        """Whether `more_bytes` fit beside what is held, with the batch's KV cache at `kv_bytes`
        (as it is now when None)."""
        kv = self._kv_bytes if kv_bytes is None else kv_bytes
        return self.weights_bytes + kv + self.kept_bytes + more_bytes <= self.budget_bytes

    def give_up_kept(self, more_bytes: int = 0, kv_bytes: int | None = None) -> bool:
        """Shrink the kept prefixes until `fits(more_bytes, kv_bytes)`, if they can make it so;
        whether it fits now."""
        if self.fits(more_bytes, kv_bytes):
            return True
        kv = self._kv_bytes if kv_bytes is None else kv_bytes
        self.kept.shrink_to(max(0, self.budget_bytes - self.weights_bytes - kv - more_bytes))
        return self.fits(more_bytes, kv_bytes)
