"""Models loaded in this worker, kept under a byte budget.

Before a load the model's size is estimated from its files (shared/sizing.py);
least recently used idle models are evicted until it fits, and what cannot fit is
refused with the sizes in the error. A model serving a request or being loaded
is never evicted. System-memory thresholds (psutil) evict on their own: at the
warning level down to the most recently used model, at the critical level every
idle model, and no load starts while memory stays critical.

Reading the files is worker/model_files.py's. Only the engine thread loads and
unloads (MLX arrays belong to the thread that runs them); the heartbeat thread
reads `snapshot()` under the lock.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil

from shared import sizing
from shared.errors import ExceedsMemoryBudget, GenerationFailed, InsufficientMemory, MlxqError
from shared.models import ModelRegistry, ModelSpec, kind_of
from shared.settings import Settings
from shared.sizing import KvShape, format_bytes
from shared.tokenizing import context_length
from worker import cache_shape, model_files
from worker.ledger import MemoryLedger
from worker.model_files import is_allocation_failure

logger = logging.getLogger(__name__)

MemoryProbe = Callable[[], float]
"""Returns system memory in use, percent."""


def system_memory_percent() -> float:
    return float(psutil.virtual_memory().percent)


def device_memory_bytes() -> int:
    """Memory the models compete for: the GPU's on CUDA, unified memory on Apple silicon, RAM on CPU."""
    info = mx.device_info()
    size = info.get("memory_size") or info.get("total_memory")
    return int(size) if size else int(psutil.virtual_memory().total)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    size_bytes: int
    """Estimated from the files before loading."""
    measured_bytes: int
    """MLX active memory that the load added."""
    kv: KvShape
    """What a row's cache holds, measured once loaded (worker/cache_shape.py)."""
    caches: cache_shape.CacheKind
    """What its caches can do (batched, cut, prefilled together), asked once loaded."""
    context_tokens: int | None
    """Its context length (the models file's, else its config.json's), when known."""
    kind: str
    """"generate" (mlx-lm) or "embed" (mlx-embeddings: worker/embedding.py)."""
    identity: str
    """Its files' identity (worker/model_files.py): what its caches on disk are filed under."""
    loaded_at: float
    last_used: float
    active: int = 0
    keep_alive_s: float | None = None
    """The last request's keep_alive (Ollama's): seconds idle before unloading, < 0 for ever; None:
    the model's or the service's."""


class ModelCache:
    """LRU cache of loaded models, its bytes written in the worker's memory ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: MemoryLedger,
        probe: MemoryProbe = system_memory_percent,
        registry: ModelRegistry | None = None,
    ) -> None:
        """`registry`, the live one, says which models are pinned now (an entry may change while loaded)."""
        self.settings = settings
        self.ledger = ledger
        self.probe = probe
        self.registry = registry
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    # -- what the engine calls -------------------------------------------------

    def acquire(
        self, spec: ModelSpec, context_tokens: int, keep_alive_s: float | None = None
    ) -> tuple[LoadedModel, float]:
        """The model, loaded if need be, marked as serving; and the seconds spent loading it. A
        `keep_alive_s` (the request's) is how long it stays loaded once idle, from now on."""
        entry = self._loaded.get(spec.name)
        if entry is not None and (entry.spec.source, entry.spec.context_tokens) != (spec.source, spec.context_tokens):
            # The name now means other files (the live registry): the old ones go once idle; until
            # then the jobs that hold them finish on them.
            if self.unload(spec.name, f"its entry now names {spec.source}"):
                entry = None
        spent = 0.0
        if entry is None:
            started = time.perf_counter()
            entry = self._load(spec, context_tokens)
            spent = time.perf_counter() - started
        with self._lock:
            entry.active += 1
            entry.last_used = time.time()
            if keep_alive_s is not None:
                entry.keep_alive_s = keep_alive_s
        return entry, spent

    def pinned(self, name: str) -> bool:
        """Whether the model is pinned (never unloaded for idleness or room), as its entry says now."""
        spec = self.registry.find(name) if self.registry is not None else None
        if spec is None:
            entry = self._loaded.get(name)
            spec = entry.spec if entry is not None else None
        return spec is not None and spec.pin

    def keep_alive_of(self, entry: LoadedModel) -> float:
        """Seconds the model may sit idle before it is unloaded (< 0: for ever)."""
        if entry.keep_alive_s is not None:
            return entry.keep_alive_s
        spec = self.registry.find(entry.spec.name) if self.registry is not None else None
        return (spec or entry.spec).keep_alive_s or self.settings.keep_alive_s

    def expires_at(self, entry: LoadedModel) -> float | None:
        """When an idle model will be unloaded (epoch seconds); None: not while it serves, is pinned
        or is kept for ever."""
        keep_alive = self.keep_alive_of(entry)
        if entry.active > 0 or keep_alive < 0 or self.pinned(entry.spec.name):
            return None
        return entry.last_used + keep_alive

    def serving(self, name: str) -> bool:
        """Whether the model is loaded and a job still uses it (its keep-alive does not count yet)."""
        with self._lock:
            entry = self._loaded.get(name)
            return entry is not None and entry.active > 0

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None:
                entry.active = max(0, entry.active - 1)
                entry.last_used = time.time()

    def maintain(self) -> None:
        """Unload idle models past their keep-alive, and evict by the memory thresholds."""
        now = time.time()
        for entry in list(self._loaded.values()):
            expires = self.expires_at(entry)
            if expires is not None and now >= expires:
                idle, keep_alive = now - entry.last_used, self.keep_alive_of(entry)
                self.unload(entry.spec.name, f"idle for {idle:.0f} s (keep_alive {keep_alive:g} s)")
        used = self.probe()
        if used >= self.settings.memory_warning_percent and self.ledger.kept_bytes > 0:
            # Kept prefixes are the cheapest memory to give back: they go before any model.
            self.ledger.drop_kept()
            self._free()
            logger.info("dropped the kept prompt prefixes: system memory at %.1f %%", used)
            used = self.probe()
        if used >= self.settings.memory_critical_percent:
            self.unload_idle(keep=0, reason=f"system memory at {used:.1f} % (critical)")
        elif used >= self.settings.memory_warning_percent:
            self.unload_idle(keep=1, reason=f"system memory at {used:.1f} % (warning)")

    def unload(self, name: str, reason: str) -> bool:
        """Unload an idle model now; False when it is not loaded or is serving."""
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None or entry.active > 0:
                return False
            del self._loaded[name]
        before = mx.get_active_memory()
        size = entry.size_bytes
        del entry
        self.ledger.unloaded(name)
        self._free()
        logger.info(
            "unloaded model %s (%s): %s; MLX active memory %s -> %s; holding %s of %s",
            name,
            format_bytes(size),
            reason,
            format_bytes(before),
            format_bytes(mx.get_active_memory()),
            format_bytes(self.ledger.held_bytes),
            format_bytes(self.ledger.budget_bytes),
        )
        return True

    def unload_idle(self, keep: int, reason: str) -> list[str]:
        """Unload idle models, least recently used first, keeping the `keep` most recently used."""
        with self._lock:
            newest = sorted(self._loaded.values(), key=lambda e: e.last_used)[-keep:] if keep else []
        unloaded: list[str] = []
        self._evict(lambda: False, reason, spare={e.spec.name for e in newest}, unloaded=unloaded)
        return unloaded

    def _evict(
        self, fits: Callable[[], bool], reason: str, spare: set[str] | None = None, unloaded: list[str] | None = None
    ) -> bool:
        """The one eviction routine: idle models out, least recently used first (never one in
        `spare`), until `fits()`; whether it fits in the end."""
        while not fits():
            with self._lock:
                idle = [e for e in self._loaded.values() if e.active == 0 and e.spec.name not in (spare or ())]
            idle = [e for e in idle if not self.pinned(e.spec.name)]  # pinned: never evicted
            if not idle:
                return False
            victim = min(idle, key=lambda e: e.last_used).spec.name
            if not self.unload(victim, reason):
                return False  # it began serving meanwhile
            if unloaded is not None:
                unloaded.append(victim)
        return True

    def failure(self, exc: BaseException, job_ids: str, doing: str, work: str) -> BaseException:
        """What a job whose `work` ("Generation", "Embedding") failed while `doing` it ends with: an MlxqError as
        it is; memory that ran out freed (the process lives on) and said; anything else logged and said."""
        if isinstance(exc, MlxqError):
            return exc
        if is_allocation_failure(exc):
            self.emergency_cleanup(f"allocation failed during job {job_ids}")
            return InsufficientMemory(f"Memory ran out while {doing}: {exc}")
        logger.error("%s failed", work.lower(), exc_info=exc, extra={"job_id": job_ids})
        return GenerationFailed(f"{work} failed: {type(exc).__name__}: {exc}")

    def emergency_cleanup(self, reason: str) -> None:
        """After an allocation failure: every idle model out, and MLX's buffer cache emptied."""
        self.unload_idle(keep=0, reason=reason)
        self._free()

    def kv_room_bytes(self) -> int:
        """The most the running batch's KV cache may take (any thread): the budget less the weights that
        cannot give way to it (models in use, pinned or loading); kept caches and idle models can
        (`room_for` makes them)."""
        with self._lock:
            loaded = [(e.spec.name, e.active) for e in self._loaded.values()]
            loading = list(self._loading)
        staying = [name for name, active in loaded if active > 0 or self.pinned(name)] + loading
        return self.ledger.budget_bytes - sum(self.ledger.weights_of(name) for name in staying)

    def room_for(self, kv_bytes: int) -> bool:
        """Whether the running batch's KV cache may grow to `kv_bytes`: kept prefixes are dropped,
        then idle models evicted (least recently used first), to make room."""
        ledger = self.ledger
        if ledger.give_up_kept(kv_bytes=kv_bytes):
            return True
        return self._evict(
            lambda: ledger.fits(kv_bytes=kv_bytes), "least recently used; making room for a running batch's KV cache"
        )

    # -- what the heartbeat reads ------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            loaded = [
                {
                    "name": e.spec.name,
                    "size_bytes": e.size_bytes,
                    "measured_bytes": e.measured_bytes,
                    "loaded_at": e.loaded_at,
                    "last_used": e.last_used,
                    "active_requests": e.active,
                    "state": "loaded",
                    "pinned": self.pinned(e.spec.name),
                    "expires_at": self.expires_at(e),
                }
                for e in self._loaded.values()
            ]
            loading = [
                {"name": name, "size_bytes": self.ledger.weights_of(name), "active_requests": 0, "state": "loading"}
                for name in self._loading
            ]
        return loaded + loading

    def loaded_names(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    # -- loading -------------------------------------------------------------------

    def _load(self, spec: ModelSpec, context_tokens: int) -> LoadedModel:
        started = time.perf_counter()
        directory = model_files.files(spec)
        estimate = sizing.estimate(directory)
        need = estimate.total(context_tokens)
        what = (
            f"model '{spec.name}' needs about {format_bytes(need)} (weights {format_bytes(estimate.weights_bytes)}"
            f" + KV cache {format_bytes(estimate.kv.bytes_for(context_tokens))} for {context_tokens} tokens)"
        )
        budget = self.ledger.budget_bytes
        if need > budget:
            raise ExceedsMemoryBudget(
                f"The {what}, more than this worker's whole budget of {format_bytes(budget)}",
                param="model" if estimate.weights_bytes > budget else "max_tokens",
            )
        used = self.probe()
        if used >= self.settings.memory_critical_percent:
            self.unload_idle(keep=0, reason=f"system memory at {used:.1f} % before loading {spec.name}")
            used = self.probe()
            if used >= self.settings.memory_critical_percent:
                raise InsufficientMemory(
                    f"System memory is at {used:.1f} % (critical: {self.settings.memory_critical_percent} %); "
                    f"no model loads until it drops. The {what}.",
                    retry_after_s=self.settings.memory_retry_after_s,
                )
        if not self.ledger.give_up_kept(need) and not self._evict(
            lambda: self.ledger.fits(need), f"least recently used; making room for {spec.name}"
        ):
            raise InsufficientMemory(
                f"The {what}; the budget is {format_bytes(budget)} and "
                f"{self._held_description()} cannot be unloaded now",
                retry_after_s=self.settings.memory_retry_after_s,
            )

        self.ledger.hold_weights(spec.name, estimate.weights_bytes)  # first: a loading model shows its size
        with self._lock:
            self._loading.add(spec.name)
        try:
            before = mx.get_active_memory()
            model, tokenizer = self._read(spec, directory, what)
            measured = max(0, mx.get_active_memory() - before)
        except BaseException:
            self.ledger.drop_weights(spec.name)
            raise
        finally:
            with self._lock:
                self._loading.discard(spec.name)
        now = time.time()
        kind = kind_of(spec)
        embeds = kind == "embed"  # no KV cache to measure: it encodes, it does not generate
        entry = LoadedModel(
            spec=spec,
            model=model,
            tokenizer=tokenizer,
            size_bytes=estimate.weights_bytes,
            measured_bytes=measured,
            kv=estimate.kv if embeds else cache_shape.measured(model, fallback=estimate.kv),
            caches=cache_shape.CacheKind((), False, False) if embeds else cache_shape.kind(model),
            context_tokens=spec.context_tokens or context_length(directory / "config.json"),
            kind=kind,
            identity=model_files.identity(directory),
            loaded_at=now,
            last_used=now,
        )
        with self._lock:
            self._loaded[spec.name] = entry
        logger.info(
            "loaded model %s from %s in %.2f s: estimated %s, measured %s; holding %s of %s",
            spec.name,
            spec.source,
            time.perf_counter() - started,
            format_bytes(entry.size_bytes),
            format_bytes(entry.measured_bytes),
            format_bytes(self.ledger.held_bytes),
            format_bytes(budget),
        )
        return entry

    def _read(self, spec: ModelSpec, directory: Path, what: str) -> tuple[Any, Any]:
        """The model and its tokenizer; memory that ran out is freed and said."""
        try:
            return model_files.read(spec, directory)
        except (MemoryError, RuntimeError) as exc:
            self.emergency_cleanup(f"allocation failed while loading {spec.name}")
            raise InsufficientMemory(f"Memory ran out while loading the {what}: {exc}") from exc

    def _held_description(self) -> str:
        held = [
            f"{e.spec.name} ({format_bytes(e.size_bytes)}, {e.active} active request{'s' if e.active != 1 else ''})"
            for e in self._loaded.values()
        ]
        return "what is held: " + (", ".join(held) if held else "nothing")

    @staticmethod
    def _free() -> None:
        gc.collect()
        mx.clear_cache()
