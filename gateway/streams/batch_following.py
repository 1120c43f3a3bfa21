"""Following a batch as server-sent events: each child's end, then the synthesis's text, then the end.

Event ids resume a follower with Last-Event-ID: a batch stream id while children
are still ending, `synthesis:<id>` once the synthesis's own stream is followed.
While nothing arrives, the follower sweeps the batch (shared/batch_progress.py),
so a child's end that nobody recorded still shows up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from redis import Redis
from starlette.concurrency import run_in_threadpool

from gateway.http.json_answer import json_text
from gateway.streams.following import BLOCK_MS, Entry, follow
from gateway.streams.hub import StreamHub
from shared import batch_progress, job_stream, keys

SYNTHESIS = "synthesis:"
"""Prefix of the event ids of the synthesis's part."""


def _event(event_id: str | None, kind: str, data: dict[str, Any]) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {json_text(data)}\n\n"


async def follow_batch(
    redis: Redis, streams: StreamHub, record: dict[str, Any], after: str | None, ttl_s: int
) -> AsyncIterator[str]:
    """`child` events as children end, then `children_done`, then `synthesis_status`/`synthesis_text`/
    `synthesis_end` as the synthesis runs, and `end` (a batch without synthesis ends after its children)."""
    batch_id = record["id"]
    synthesis_after = "0-0"
    if after is not None and after.startswith(SYNTHESIS):
        synthesis_after = after.removeprefix(SYNTHESIS)
    else:
        sub = streams.subscribe(keys.batch_stream(batch_id), after or "0-0")
        try:
            children_done = False
            while not children_done:
                raw = await sub.next(BLOCK_MS / 1000)
                if not raw:
                    state = await run_in_threadpool(batch_progress.sweep, redis, batch_id, ttl_s)
                    if state == "gone":
                        yield _event(None, "end", {"status": "expired"})
                        return
                    continue
                for raw_id, fields in raw:
                    entry = Entry(raw_id, *job_stream.decode(fields))
                    yield _event(entry.id, entry.kind, entry.data)
                    if entry.kind == "end":
                        return
                    children_done = children_done or entry.kind == "children_done"
        finally:
            streams.unsubscribe(sub)
    synthesis_id = record.get("synthesis_job_id")
    if not synthesis_id:
        return
    ended: dict[str, Any] = {}
    async for entry in follow(streams, synthesis_id, after=synthesis_after):
        yield _event(SYNTHESIS + entry.id, "synthesis_" + entry.kind, entry.data)
        ended = entry.data
    yield _event(None, "end", {"status": "completed", "synthesis": ended.get("status")})
