"""Clients that stop reading, or stop sending, are let go after a limit.

A response the client leaves unread (its socket full, never drained) would hold
the stream, and the job behind it, for ever: uvicorn's write waits on the
client. A body sent halfway and then left would hold its connection the same
way, and so would a connection that never sends a whole request head. Past the
limit, the first is cut (the route's own hang-up handling cancels its job), the
second is answered 408, the third closed (`PatientH11`, uvicorn's own protocol
class with a timer uvicorn does not have). ASGI has no way to abort a connection:
uvicorn closes the cut one once its buffer drains or the client goes, but the
job is canceled at once.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.http.body_limit import send_error
from shared.errors import MlxqError

logger = logging.getLogger(__name__)


class RequestTimeout(MlxqError):
    """The body stopped arriving halfway."""

    status_code = 408
    code = "request_timeout"


class _Unread(Exception):
    """The client left the response unread past the limit."""


class SlowClientLimits:
    """Pure ASGI middleware: a time limit on each write of the response and on each read of the body."""

    def __init__(self, app: ASGIApp, unread_s: float, body_s: float) -> None:
        self.app = app
        self.unread_s = unread_s
        self.body_s = body_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        timed_out = False
        body_done = False

        async def timed_receive() -> Message:
            nonlocal timed_out, body_done
            if body_done:
                return await receive()  # past the body, receive only waits for a hang-up
            try:
                async with asyncio.timeout(self.body_s):  # no task of its own, unlike wait_for
                    message = await receive()
            except TimeoutError:
                timed_out = True
                if not started:
                    await send_error(send, RequestTimeout(f"The request body stopped arriving for {self.body_s:g} s"))
                return {"type": "http.disconnect"}
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def timed_send(message: Message) -> None:
            nonlocal started
            if timed_out:
                return
            if message["type"] == "http.response.start":
                started = True
            try:
                async with asyncio.timeout(self.unread_s):
                    await send(message)
            except TimeoutError:
                raise _Unread() from None

        try:
            await self.app(scope, timed_receive, timed_send)
        except Exception as exc:
            if not _is_unread(exc):
                raise
            logger.info("a client left its response unread for %.0f s; letting it go", self.unread_s)


def _is_unread(exc: BaseException) -> bool:
    if isinstance(exc, _Unread):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_unread(inner) for inner in exc.exceptions)
    return False


class PatientH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a limit on how long a new connection may take to send a whole
    request head: uvicorn's own keep-alive timer starts only after a first response, so a client that
    opens connections and sends half a head (or nothing) would hold each one for ever."""

    head_limit_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_limit_s, self._head_overdue)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on this connection gets the same limit (uvicorn cancels its keep-alive
        # timer at the first byte of it).
        self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_limit_s, self._head_overdue)

    def _head_overdue(self) -> None:
        between = self.cycle is None or self.cycle.response_complete
        if between and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("a client sent no whole request head in %.0f s; closing its connection", self.head_limit_s)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)


def patient_h11(head_limit_s: float) -> type[PatientH11]:
    """The protocol class for uvicorn's `http=`, with this limit."""
    return type("PatientH11", (PatientH11,), {"head_limit_s": head_limit_s})
