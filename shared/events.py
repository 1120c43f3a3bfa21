"""Supervision events: a capped Redis Stream the watchdog writes and `GET /v1/events` reads."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, cast

from redis import Redis

from shared import keys
from shared.outage import REDIS, UNREACHABLE
from shared.text import text

logger = logging.getLogger(__name__)

KINDS = frozenset(
    {
        "worker_started",
        "worker_ready",
        "worker_died",
        "worker_hung",
        "worker_restarted",
        "circuit_opened",
        "circuit_half_open",
        "circuit_closed",
        "job_requeued",
        "job_quarantined",
        "job_handed_back",
        "model_swap",
        "redis_degraded",
    }
)


WRITE_ATTEMPTS = 300
"""Seconds an outage's event waits for Redis to take it, on a thread of its own."""


def record_outages(redis: Redis, process: str) -> None:
    """Each Redis outage this process lives through becomes a `redis_degraded` event once it is over
    (during it, nothing can be written)."""

    def write(condition: str, lasted_s: float, failures: int) -> None:
        # A read can succeed while writes are still refused (a full memory, a full disk), and end the
        # outage for this process before Redis takes the event: it is tried again until it does.
        data = {"process": process, "condition": condition, "lasted_s": lasted_s, "failures": failures}
        for _ in range(WRITE_ATTEMPTS):
            try:
                emit(redis, "redis_degraded", **data)
                return
            except UNREACHABLE:
                time.sleep(1.0)
            except Exception as exc:
                logger.warning("could not record the end of a Redis outage: %s", type(exc).__name__)
                return
        logger.warning("could not record the end of a Redis outage: Redis refused it for %d s", WRITE_ATTEMPTS)

    def record(condition: str, lasted_s: float, failures: int) -> None:
        # On a thread of its own: the outage may end on the gateway's event loop, which must not wait.
        args = (condition, round(lasted_s, 1), failures)
        threading.Thread(target=write, args=args, name="mlxq-outage-event", daemon=True).start()

    REDIS.on_back(record)


def emit(redis: Redis, kind: str, **data: Any) -> str:
    """Append an event; the stream keeps roughly the newest `keys.EVENTS_MAXLEN`."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    fields = {"kind": kind, "at": f"{time.time():.3f}", "data": json.dumps(data)}
    event_id = redis.xadd(keys.EVENTS, fields, maxlen=keys.EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
    return text(event_id)


def read(redis: Redis, after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Events after the cursor `after`, oldest first; without one, the latest `limit`, oldest first."""
    entries: list[tuple[bytes, dict[bytes, bytes]]]
    if after:
        entries = cast(Any, redis.xrange(keys.EVENTS, min=f"({after}", count=limit))
    else:
        entries = list(reversed(cast(Any, redis.xrevrange(keys.EVENTS, count=limit))))
    events = []
    for event_id, fields in entries:
        decoded = {text(k): text(v) for k, v in fields.items()}
        events.append(
            {"id": text(event_id), "kind": decoded["kind"], "at": float(decoded["at"]), **json.loads(decoded["data"])}
        )
    return events
