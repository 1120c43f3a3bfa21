"""Live workers, as their own heartbeat records in Redis describe them."""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis

from shared import keys


def live_workers(redis: Redis) -> list[dict[str, Any]]:
    """Every worker whose heartbeat key has not expired, with `last_seen_s` added."""
    names = sorted(redis.scan_iter(match=keys.worker_heartbeat_pattern(), count=100))
    if not names:
        return []
    records = []
    now = time.time()
    for raw in redis.mget(names):
        if raw is None:
            continue  # expired between SCAN and MGET
        record: dict[str, Any] = json.loads(raw)
        record["last_seen_s"] = round(max(0.0, now - float(record.get("at", now))), 2)
        records.append(record)
    return records
