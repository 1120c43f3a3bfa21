"""The model registry kept current: the models file and the admin API's entries, re-read when either changes.

Every gateway and worker holds one ModelRegistry (shared/models.py) and a
LiveModels thread that replaces its contents when the models file's stamp or
Redis's registry version moves, within a second, without a restart. The admin
API's entries (models added, pulled, copied, pinned) live in one Redis hash
beside the version counter, written together in one transaction. A malformed
file or an unreachable Redis keeps the registry as it was (and says so once).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis

from shared import keys
from shared.models import ModelRegistry
from shared.outage import UNREACHABLE
from shared.settings import Settings

logger = logging.getLogger(__name__)

REFRESH_S = 1.0


def stored_entries(redis: Redis) -> dict[str, dict[str, Any]]:
    """The admin API's entries by model name (fields laid over a models file's entry of that name)."""
    entries: dict[str, dict[str, Any]] = {}
    for name, raw in redis.hgetall(keys.MODELS).items():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries[name.decode() if isinstance(name, bytes) else str(name)] = entry
    return entries


def store(redis: Redis, name: str, entry: dict[str, Any] | None) -> None:
    """Write (or with None, remove) a model's stored entry; every registry sees it at its next refresh."""
    with redis.pipeline(transaction=True) as pipe:
        if entry is None:
            pipe.hdel(keys.MODELS, name)
        else:
            pipe.hset(keys.MODELS, name, json.dumps(entry))
        pipe.incr(keys.MODELS_VERSION)
        pipe.execute()


class LiveModels:
    """Keeps `registry` current from the models file and Redis, on a thread of its own."""

    def __init__(self, settings: Settings, redis: Redis, registry: ModelRegistry | None = None) -> None:
        """A malformed models file raises here (start-up stops, naming it); later it is only logged."""
        self.settings = settings
        self.redis = redis
        self.registry = registry or ModelRegistry.from_settings(settings)
        self.registry.on_miss = self.refresh
        self._seen: tuple[object, object] | None = None
        self._trouble = ""
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] | None = None
        """Called (on the refreshing thread) after the registry changed."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlxq-models", daemon=True)
        self.refresh()

    def start(self) -> LiveModels:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> bool:
        """Re-read the registry if the file or the stored entries changed; True when it did."""
        with self._lock:  # one reader at a time: a slow one must not put back what it read earlier
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            version = self.redis.get(keys.MODELS_VERSION)
            stamp = (_file_stamp(self.settings.models_file), version)
            if stamp == self._seen:
                return False
            stored = stored_entries(self.redis)
            self.registry.replace(ModelRegistry.from_settings(self.settings, stored))
            logger.info("model registry: %d models (%d from the API)", len(self.registry.all()), len(stored))
        except UNREACHABLE as exc:
            self._say(f"Redis unreachable ({type(exc).__name__}); models as they were")
            return False
        except (OSError, ValueError) as exc:
            self._say(f"the models file is not usable, models as they were: {exc}")
            return False
        self._seen, self._trouble = stamp, ""
        if self.on_change is not None:
            self.on_change()
        return True

    def _say(self, trouble: str) -> None:
        if trouble != self._trouble:
            self._trouble = trouble
            logger.warning("model registry: %s", trouble)

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh()
            except Exception:
                logger.exception("model registry refresh failed")


def _file_stamp(path: Path | None) -> object:
    if path is None:
        return None
    try:
        stat = path.expanduser().stat()
    except OSError:
        return "missing"
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
