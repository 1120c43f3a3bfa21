"""Live workers, as their own heartbeat records in Redis describe them."""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis
from rq import Worker
from rq.worker_registration import get_keys

from shared import keys


def live_workers(redis: Redis) -> list[dict[str, Any]]:
    """Every registered worker whose heartbeat key has not expired, with `last_seen_s` added.

    The names come from RQ's own worker registry, so this costs one SMEMBERS and one
    MGET however many jobs Redis holds (a SCAN for heartbeat keys would walk them all)."""
    prefix = Worker.redis_worker_namespace_prefix
    names = sorted(key.removeprefix(prefix) for key in get_keys(connection=redis))
    if not names:
        return []
    records = []
    now = time.time()
    for raw in redis.mget([keys.worker_heartbeat(name) for name in names]):
        if raw is None:
            continue  # expired between SCAN and MGET
        record: dict[str, Any] = json.loads(raw)
        record["last_seen_s"] = round(max(0.0, now - float(record.get("at", now))), 2)
        records.append(record)
    return records
