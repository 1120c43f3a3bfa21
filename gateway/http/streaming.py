"""A streamed response whose body is closed the moment the stream stops, however it stops.

Starlette's StreamingResponse leaves its body iterator to the garbage collector
when a send fails (a client gone, or let go by gateway/http/slow_clients.py): the
route's generator, and the `finally` that cancels a hung-up client's job
(gateway/streams/waiting.py), then run whenever the cycle collector gets to them,
seconds or minutes later, while the job goes on generating for nobody. Here the
body is closed as the response ends.
"""

from __future__ import annotations

from starlette.responses import StreamingResponse as _StarletteStreamingResponse
from starlette.types import Send


class StreamingResponse(_StarletteStreamingResponse):
    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
