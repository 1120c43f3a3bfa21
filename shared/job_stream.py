"""A job's stream: what a client following the job sees, in order.

Entries are `{"type": ..., "data": <json>}`:
- `status`: `{"status": "started" | "queued"}` (queued again: requeued or handed back);
- `text`: `{"text": "..."}`, a piece of the answer's text as soon as it is safe to show (with
  `logprobs` when asked for);
- `reasoning`: `{"text": "..."}`, a piece of the model's reasoning, apart from the answer;
- `call`: `{"index", "id", "name"}`, a tool call begins; `arguments`: `{"index", "text"}`, more of
  its arguments (JSON text, as it forms);
- `end`: `{"status": "finished" | "failed" | "canceled", "result": {...} | "error": {...}}`.
Output entries (the four kinds between) also carry `seq`, 1 for the job's first and one more for
each after, across every attempt at the job, and `tokens`, the ids generated since the one before;
the last piece of a generation that ended also carries `final`, its finish reason.
A follower drops an entry it has seen (a write retried, an attempt repeating itself) and knows a gap
when it sees one (gateway/streams/following.py); a job run again after its worker died continues from the
tokens its stream holds (`resumed`), so the stream reads as one generation.
Stream ids are the SSE event ids, so a client resumes with Last-Event-ID.
Workers write text through a publisher thread (worker/streaming.py); everything
that ends a job (worker, gateway cancel, watchdog quarantine) writes `end`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline

from shared import json_bytes, keys


def entry(kind: str, **data: Any) -> dict[str, str | bytes]:
    return {"type": kind, "data": json_bytes.dumps(data)}


def append(target: Redis | Pipeline, job_id: str, kind: str, ttl_s: int | None, **data: Any) -> None:
    """Add one entry and, given `ttl_s`, keep the stream that long from now; with its notice, in one round trip."""
    if not isinstance(target, Pipeline):  # (a Pipeline is a Redis too)
        with target.pipeline(transaction=False) as pipe:
            append(pipe, job_id, kind, ttl_s, **data)
            pipe.execute()
        return
    add(target, job_id, kind, ttl_s, **data)
    notice(target, [keys.job_stream(job_id)])


def add(pipe: Pipeline, job_id: str, kind: str, ttl_s: int | None, **data: Any) -> None:
    """`append` without its notice, for a writer that notices many entries at once (`notice`).

    Text entries pass None for `ttl_s`: the TTL set when the job started covers them, and one
    command per token less matters on a fast model."""
    stream = keys.job_stream(job_id)
    pipe.xadd(stream, entry(kind, **data))  # type: ignore[arg-type]
    if ttl_s is not None:
        pipe.expire(stream, ttl_s)


def notice(pipe: Pipeline, streams: list[str]) -> None:
    """Tell the gateways' stream readers that `streams` were written (after the writes, in the same pipeline:
    a reader that sees the notice finds the entries). A notice lost (Redis came back without it) delays a
    follower until its reader's sweep (gateway/streams/hub.py), never loses an entry."""
    pipe.xadd(keys.STREAMS_WRITTEN, {"k": " ".join(streams)}, maxlen=keys.STREAMS_WRITTEN_MAXLEN, approximate=True)


def end(redis: Redis, job_id: str, status: str, ttl_s: int, **data: Any) -> None:
    """Mark the job's stream as ended (finished, failed or canceled)."""
    append(redis, job_id, "end", ttl_s, status=status, **data)


def decode(fields: dict[Any, Any]) -> tuple[str, dict[str, Any]]:
    """(type, data) of a raw stream entry."""
    kind = fields.get(b"type", fields.get("type", b""))
    raw = fields.get(b"data", fields.get("data", b"{}"))
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    data: dict[str, Any] = orjson.loads(raw)
    return kind, data


OUTPUT = frozenset({"text", "reasoning", "call", "arguments"})
"""The kinds of entry that carry the job's output, each with its `seq` and `tokens`."""


@dataclass(frozen=True)
class Resumed:
    """What earlier attempts at a job put in its stream: where the next one carries on."""

    seq: int = 0
    """The last output entry's `seq` (0: none yet)."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    call_ids: dict[int, str] = field(default_factory=dict)
    """The ids its tool calls were shown with, by index."""
    finished: str | None = None
    """How the earlier attempt ended, when its last pieces (marked `final`) are in: it only has to
    be told again."""


def started(redis: Redis, job_id: str, ttl_s: int) -> Resumed:
    """Mark the job's stream as started (kept `ttl_s` from now) and read what earlier attempts put in it,
    in one round trip: a job's start is on the way to its first token."""
    with redis.pipeline(transaction=False) as pipe:
        start_on(pipe, job_id, ttl_s)
        *_, entries = pipe.execute()
    return resumed(entries)


def start_on(pipe: Pipeline, job_id: str, ttl_s: int) -> None:
    """`started`'s commands on `pipe`, the last one the read whose answer `resumed` takes."""
    append(pipe, job_id, "status", ttl_s, status="started")
    pipe.xrange(keys.job_stream(job_id))


def resumed(entries: list[Any] | None) -> Resumed:
    """The output entries already in a job's stream (`entries`, as XRANGE reads them), in order and
    without repeats, up to the first gap (what comes after a gap cannot be carried on from)."""
    seq, tokens, logprobs, call_ids = 0, list[int](), list[dict[str, Any]](), dict[int, str]()
    finished = None
    for _, fields in entries or []:
        kind, data = decode(fields or {})
        if kind not in OUTPUT or not isinstance(data.get("seq"), int):
            continue
        if data["seq"] <= seq:
            continue
        if data["seq"] != seq + 1:
            break
        seq = data["seq"]
        tokens += data.get("tokens", [])
        logprobs += data.get("logprobs") or []
        if kind == "call":
            call_ids[int(data["index"])] = str(data["id"])
        finished = data.get("final")
    return Resumed(seq, tokens, logprobs, call_ids, finished)
