"""Every Redis key mlxq writes, and its TTL, in one place.

RQ keeps its own keys under `rq:`; these are the few things RQ does not keep.
"""

from __future__ import annotations

PREFIX = "mlxq"

CANCEL_TTL_S = 24 * 3600
"""A cancel flag outlives any job it could still apply to."""


def worker_heartbeat(worker_name: str) -> str:
    """JSON snapshot a worker refreshes every heartbeat interval; expires when it goes silent."""
    return f"{PREFIX}:worker:{worker_name}:heartbeat"


def worker_heartbeat_pattern() -> str:
    return f"{PREFIX}:worker:*:heartbeat"


def job_cancel(job_id: str) -> str:
    """Set by the gateway to stop a running job; polled by the worker between tokens."""
    return f"{PREFIX}:job:{job_id}:cancel"
