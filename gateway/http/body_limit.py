"""Refuse request bodies over the size limit before they are read into memory (413)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import MlxqError, RequestTooLarge


class BodySizeLimit:
    """Pure ASGI middleware: trusts Content-Length when given, counts the bytes when not."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refusal: Callable[[], Awaitable[Any]]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return

        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        refused = True
                        await self._refuse(send, received)
                    # The app sees a hang-up and stops reading; its own reply is dropped below.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send: Send, size: int) -> None:
        error = RequestTooLarge(f"The request body has at least {size} bytes; the limit is {self.max_bytes}")
        await send_error(send, error)
        await self.on_refusal()


async def send_error(send: Send, error: MlxqError) -> None:
    """An error answered from ASGI middleware, before any route (so in mlxq's own shape)."""
    body = json.dumps(error.to_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
