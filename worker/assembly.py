"""The engine and what it runs on, built in one place: the memory ledger is made here once and
handed to the model cache and the scheduler, which both ask it."""

from __future__ import annotations

from shared.models import ModelRegistry
from shared.settings import Settings
from worker.engine import Engine
from worker.kv_manager import KVCacheManager
from worker.ledger import MemoryLedger
from worker.model_cache import MemoryProbe, ModelCache, system_memory_percent
from worker.prefill_pace import PrefillPace
from worker.prefix_disk import PrefixDisk
from worker.prefix_files import default_budget
from worker.scheduler import Scheduler


def build_engine(
    settings: Settings,
    budget_bytes: int,
    probe: MemoryProbe = system_memory_percent,
    prefix_cache_bytes: int | None = None,
    registry: ModelRegistry | None = None,
) -> Engine:
    """An engine (not started) under `budget_bytes`; kept prefixes get `prefix_cache_bytes` of it
    (MLXQ_PREFIX_CACHE_FRACTION of the budget unless given). `registry` (the live one) says which
    models are pinned."""
    if prefix_cache_bytes is None:
        prefix_cache_bytes = int(budget_bytes * settings.prefix_cache_fraction)
    disk_root = settings.data_dir.expanduser() / "prefixes"
    disk_bytes = settings.prefix_disk_bytes if settings.prefix_disk_bytes is not None else default_budget(disk_root)
    kv = KVCacheManager(prefix_cache_bytes, PrefixDisk(disk_root, disk_bytes))
    ledger = MemoryLedger(budget_bytes, kv)
    cache = ModelCache(settings, ledger, probe, registry)
    scheduler = Scheduler(
        ledger,
        settings.max_batch,
        warning_percent=settings.memory_warning_percent,
        critical_percent=settings.memory_critical_percent,
        retry_after_s=settings.memory_retry_after_s,
        share_prefixes=kv.enabled,
        kv_room=cache.kv_room_bytes,
    )
    return Engine(
        cache,
        kv,
        scheduler,
        settings.maintenance_interval_s,
        PrefillPace(settings.prefill_pause_steps, settings.prefill_step_size),
        settings.prefill_batch_size,
    )
