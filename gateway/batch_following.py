"""Following a batch as server-sent events: each child's end, then the synthesis's text, then the end.

Event ids resume a follower with Last-Event-ID: a batch stream id while children
are still ending, `synthesis:<id>` once the synthesis's own stream is followed.
While nothing arrives, the follower sweeps the batch (shared/batch_progress.py),
so a child's end that nobody recorded still shows up.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from starlette.concurrency import run_in_threadpool

from gateway.following import BLOCK_MS, entries_of, follow
from shared import batch_progress, keys

SYNTHESIS = "synthesis:"
"""Prefix of the event ids of the synthesis's part."""


def _event(event_id: str | None, kind: str, data: dict[str, Any]) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


async def follow_batch(
    redis: Redis, aredis: AsyncRedis, record: dict[str, Any], after: str | None, ttl_s: int
) -> AsyncIterator[str]:
    """`child` events as children end, then `children_done`, then `synthesis_status`/`synthesis_text`/
    `synthesis_end` as the synthesis runs, and `end` (a batch without synthesis ends after its children)."""
    batch_id = record["id"]
    synthesis_after = "0-0"
    if after is not None and after.startswith(SYNTHESIS):
        synthesis_after = after.removeprefix(SYNTHESIS)
    else:
        stream = keys.batch_stream(batch_id)
        last = after or "0-0"
        children_done = False
        while not children_done:
            reply = await aredis.xread({stream: last}, count=256, block=BLOCK_MS)
            if not reply:
                state = await run_in_threadpool(batch_progress.sweep, redis, batch_id, ttl_s)
                if state == "gone":
                    yield _event(None, "end", {"status": "expired"})
                    return
                continue
            for entry in entries_of(reply):
                last = entry.id
                yield _event(last, entry.kind, entry.data)
                if entry.kind == "end":
                    return
                children_done = children_done or entry.kind == "children_done"
    synthesis_id = record.get("synthesis_job_id")
    if not synthesis_id:
        return
    ended: dict[str, Any] = {}
    async for entry in follow(aredis, synthesis_id, after=synthesis_after):
        yield _event(SYNTHESIS + entry.id, "synthesis_" + entry.kind, entry.data)
        ended = entry.data
    yield _event(None, "end", {"status": "completed", "synthesis": ended.get("status")})
