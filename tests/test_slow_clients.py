"""Clients that stop reading or stop sending (gateway/http/slow_clients.py), through a real gateway,
worker and Redis: one that leaves its stream unread delays no other stream and is let go after the
limit, its job canceled; a body that stops halfway is answered 408."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

UNREAD_S = 15


@pytest.fixture(scope="module")
def strict(redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/12",
        data_dir,
        tmp_path_factory.mktemp("slow-clients-logs"),
        unread_limit_s=UNREAD_S,
        body_read_limit_s=2,
        max_tokens_cap=100_000,
    )
    yield svc
    svc.stop()


def raw_request(svc: Service, head: str, body: bytes, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", svc.port))
    sock.sendall(head.encode() + body)
    return sock


@pytest.mark.timeout(400)  # filling the socket's buffers takes longer on a loaded machine
def test_an_unread_stream_slows_no_other_and_is_let_go_with_its_job_canceled(strict: Service) -> None:
    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Go on"}],
            "max_tokens": 50_000,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,  # large chunks: the socket fills in a second or two
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock = raw_request(strict, head, body, receive_buffer=4096)
    try:
        start = ""
        # The headers (one recv may bring only part of them), then nothing more is read.
        while "\r\n\r\n" not in start and (chunk := sock.recv(1024)):
            start += chunk.decode(errors="replace")
        job_id = next(line.split(":", 1)[1].strip() for line in start.split("\r\n") if line.startswith("x-mlxq-job-id"))
        time.sleep(3)  # well past filling the socket
        # Another client's stream goes through meanwhile, whole.
        other = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}
        with httpx.stream("POST", strict.base_url + "/v1/chat/completions", json=other, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert strict.job(job_id)["status"] == "started"  # still held: the limit has not passed
        # The limit runs from when the socket is full: loopback buffers hold megabytes, which a slow
        # machine fills slowly.
        view = strict.wait_for(job_id, {"canceled", "finished", "failed"}, timeout_s=UNREAD_S + 300)
        assert view["status"] == "canceled", view
    finally:
        sock.close()


def test_a_body_that_stops_halfway_is_answered_408(strict: Service) -> None:
    head = "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    sock = raw_request(strict, head, b'{"model": "tiny", ')
    sock.settimeout(30)
    reply = ""
    try:
        while "request_timeout" not in reply and (chunk := sock.recv(4096)):
            reply += chunk.decode()
    finally:
        sock.close()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "request_timeout" in reply


def test_a_connection_that_never_sends_a_whole_request_head_is_closed(strict: Service) -> None:
    sock = raw_request(strict, "GET /health HTTP/1.1\r\nHost: x\r\n", b"")  # no blank line: the head never ends
    sock.settimeout(30)
    try:
        assert sock.recv(4096) == b""  # closed by the gateway, after its limit and well before ours
    finally:
        sock.close()


def test_a_second_request_head_left_half_sent_is_closed_too(strict: Service) -> None:
    sock = raw_request(strict, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"")
    sock.settimeout(30)
    try:
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 ")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request on the kept-alive connection stops
        rest = b""
        while chunk := sock.recv(4096):  # the rest of the first answer, then the close
            rest += chunk
    finally:
        sock.close()
