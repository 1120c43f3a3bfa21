"""When each request reached this gateway, for the hops a job reports (Timings.hops_ms `received`)."""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

RECEIVED_AT: ContextVar[float | None] = ContextVar("received_at", default=None)
"""The current request's arrival, seconds since the epoch (None outside a request)."""


class ArrivalClock:
    """Pure ASGI middleware, outermost: notes the time before any other layer runs, so that a job's hops
    tell the request's way in (body, parsing, checks) from its admission."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            RECEIVED_AT.set(time.time())
        await self.app(scope, receive, send)
