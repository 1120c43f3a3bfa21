"""`/v1/events`: what the watchdog saw and did, newest last, with a cursor to follow on."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from gateway.deps import AdminDep, RedisDep
from gateway.streams.following import STREAM_ID
from shared import events

router = APIRouter(tags=["events"])


@router.get("/v1/events")
def list_events(
    redis: RedisDep,
    _admin: AdminDep,
    after: Annotated[str | None, Query(description="cursor from a previous answer", pattern=STREAM_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Supervision events (worker started/ready/died/hung/restarted, circuit changes, jobs requeued or
    quarantined); without `after`, the latest `limit`; pass the returned `cursor` as `after` to follow on.
    With API keys set, for admin keys only: the events name every client's jobs."""
    found = events.read(redis, after=after, limit=limit)
    return {"object": "list", "data": found, "cursor": found[-1]["id"] if found else after}
