"""A small HTTP/1.1 load generator: C keep-alive connections POSTing one body for D seconds.

Raw asyncio sockets rather than an HTTP client library, so the generator costs far
less CPU per request than the servers it measures. Prints one JSON line of counts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter


async def connection(host: str, port: int, request: bytes, until: float, counts: Counter[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < until:
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            counts[int(status_line.split()[1])] += 1
    finally:
        writer.close()


async def main(url_path: str, port: int, body: bytes, concurrency: int, seconds: float) -> None:
    request = (
        f"POST {url_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    counts: Counter[int] = Counter()
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(*(connection("127.0.0.1", port, request, until, counts) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    print(json.dumps({"seconds": elapsed, "status": {str(k): v for k, v in counts.items()}}))


if __name__ == "__main__":
    path, port_text, body_text, concurrency_text, seconds_text = sys.argv[1:6]
    asyncio.run(main(path, int(port_text), body_text.encode(), int(concurrency_text), float(seconds_text)))
