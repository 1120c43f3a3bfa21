"""Waiting for a job on a client's behalf: the one way every protocol gets a job's result or streams it.

A non-streaming call waits up to `MLXQ_OPENAI_WAIT_S` for its job, following the
job's stream (gateway/streams/following.py). Past the limit it is a 504 naming the job,
which goes on and can be polled; a job that ended without a result is its
recorded error; a client that hangs up first cancels its job (nobody would read
the result) and gets nothing. Every error here is one of ours, so each protocol's
routes answer it in their own shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import Request

from gateway.streams.following import Entry, WaitedTooLong, follow
from shared.errors import JobFailed, JobWaitTimeout

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
"""How often a waiting call looks whether its client is still there."""


class ClientGone(Exception):
    """The client hung up before its job's result was ready (answered 499, which nobody reads)."""


async def result(request: Request, job_id: str) -> dict[str, Any]:
    """The finished job's result. Raises JobWaitTimeout (504) past the wait limit, JobFailed with
    the job's own error, and ClientGone when the client hung up; the errors name the job."""
    wait_s: float = request.app.state.settings.openai_wait_s
    try:
        return await _unless_gone(request, job_id, time.monotonic() + wait_s)
    except WaitedTooLong:
        timeout = JobWaitTimeout(
            f"The job {job_id} did not finish within {wait_s:g} s; it goes on: "
            f"poll GET /v1/jobs/{job_id} for its result",
            param=job_id,
        )
        timeout.extra_headers = {"x-mlxq-job-id": job_id}
        raise timeout from None
    except JobFailed as failed:
        failed.extra_headers = {"x-mlxq-job-id": job_id}
        raise


async def _unless_gone(request: Request, job_id: str, deadline: float) -> dict[str, Any]:
    """`_ended`, unless the client hangs up first: then its job is canceled."""
    waiting = asyncio.ensure_future(_ended(request, job_id, deadline))
    watching = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watching.done() and not watching.cancelled()
        watching.cancel()
    if not gone:
        return await waiting
    waiting.cancel()
    logger.info("client went away before its result; canceling its job", extra={"job_id": job_id})
    cancel_quietly(request, job_id)
    raise ClientGone(job_id)


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _ended(request: Request, job_id: str, deadline: float) -> dict[str, Any]:
    """The job's result once it has ended; its error, as ours, if it did not finish."""
    async for entry in follow(request.app.state.streams, job_id, deadline=deadline, exact=False):
        if entry.kind != "end":
            continue
        if entry.data["status"] == "finished":
            finished: dict[str, Any] = entry.data["result"]
            return finished
        raise failure(entry.data)
    raise JobFailed({"message": f"the stream of job {job_id} ended without an end"})


@asynccontextmanager
async def streamed(request: Request, job_id: str, pings: bool = True) -> AsyncIterator[AsyncIterator[Entry]]:
    """The job's entries for a client's stream, up to and including its end (with `pings`, a ping after
    each quiet while). A client that hangs up first, anywhere in the block (its route's generator closed
    before the end), has its job canceled as the block exits: nobody would read the rest."""
    ended = False

    async def entries() -> AsyncGenerator[Entry]:
        nonlocal ended
        async for entry in follow(request.app.state.streams, job_id, pings=pings):
            ended = ended or entry.kind == "end"
            yield entry

    following = entries()
    try:
        yield following
    finally:
        if not ended:  # first: the await below may be where the client's cancellation lands
            logger.info("stream client went away; canceling its job", extra={"job_id": job_id})
            cancel_quietly(request, job_id)
        await following.aclose()


def failure(data: dict[str, Any]) -> JobFailed:
    """The error of a job that ended without a result, from its stream's end entry."""
    return JobFailed(data.get("error") or {"message": f"the job ended as {data.get('status')}"})


def cancel_quietly(request: Request, job_id: str) -> None:
    """Cancel the job of a client that went away; one that ended meanwhile is left as it is, and one
    Redis cannot take now is kept until it can (gateway/streams/cancels.py).

    On a thread, not awaited: it is called where the client's task is being canceled (a stream's
    `finally`), where an await would be canceled too, and a call made on the event loop would hold
    every other request while Redis answers or a connection of the pool comes free."""
    state = request.app.state
    cancel = partial(state.cancels.cancel, job_id, state.redis, state.settings.stream_ttl_s)
    try:
        running = asyncio.get_running_loop().run_in_executor(None, cancel)
    except RuntimeError:  # the gateway is shutting down, its threads with it: nobody else waits now
        cancel()
        return
    running.add_done_callback(partial(_log_failure, job_id))


def _log_failure(job_id: str, done: asyncio.Future[bool]) -> None:
    if not done.cancelled() and done.exception() is not None:
        failure = done.exception()
        logger.error("canceling the job of a client that went away failed", exc_info=failure, extra={"job_id": job_id})
