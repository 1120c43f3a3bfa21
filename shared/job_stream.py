"""A job's stream: what a client following the job sees, in order.

Entries are `{"type": ..., "data": <json>}`:
- `status`: `{"status": "started" | "queued"}` (queued again: requeued or handed back);
- `text`: `{"text": "..."}`, a piece of the answer's text as soon as it is safe to show (with
  `logprobs` when asked for);
- `reasoning`: `{"text": "..."}`, a piece of the model's reasoning, apart from the answer;
- `call`: `{"index", "id", "name"}`, a tool call begins; `arguments`: `{"index", "text"}`, more of
  its arguments (JSON text, as it forms);
- `end`: `{"status": "finished" | "failed" | "canceled", "result": {...} | "error": {...}}`.
Stream ids are the SSE event ids, so a client resumes with Last-Event-ID.
Workers write text through a publisher thread (worker/streaming.py); everything
that ends a job (worker, gateway cancel, watchdog quarantine) writes `end`.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from redis.client import Pipeline

from shared import keys


def entry(kind: str, **data: Any) -> dict[str, str]:
    return {"type": kind, "data": json.dumps(data)}


def append(target: Redis | Pipeline, job_id: str, kind: str, ttl_s: int | None, **data: Any) -> None:
    """Add one entry and, given `ttl_s`, keep the stream that long from now.

    Text entries pass None: the TTL set when the job started covers them, and one
    command per token less matters on a fast model."""
    stream = keys.job_stream(job_id)
    target.xadd(stream, entry(kind, **data))  # type: ignore[arg-type]
    if ttl_s is not None:
        target.expire(stream, ttl_s)


def end(redis: Redis, job_id: str, status: str, ttl_s: int, **data: Any) -> None:
    """Mark the job's stream as ended (finished, failed or canceled)."""
    with redis.pipeline(transaction=False) as pipe:
        append(pipe, job_id, "end", ttl_s, status=status, **data)
        pipe.execute()


def decode(fields: dict[Any, Any]) -> tuple[str, dict[str, Any]]:
    """(type, data) of a raw stream entry."""
    kind = fields.get(b"type", fields.get("type", b""))
    raw = fields.get(b"data", fields.get("data", b"{}"))
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    data: dict[str, Any] = json.loads(raw)
    return kind, data
