"""OpenAI's Responses API, `/v1/responses`, run as queued jobs like every other protocol.

Streaming sends the Responses event sequence (`response.created`, output items and
their text or argument deltas, `response.completed`; `response.failed` when the job
fails); a request that offers tools gets its items at the end, since the text may
be a call in the model's own format. `store` (true unless asked otherwise) keeps the
response for `previous_response_id`, `GET`, `DELETE` and `cancel`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gateway import jobs, response_store, submission, waiting
from gateway.deps import ClientDep, GatewayDep, RedisDep
from gateway.error_shapes import openai_error, router_for
from gateway.following import follow
from gateway.responses_api import ResponsesRequest, Shapes
from shared import keys
from shared.errors import InvalidRequest, MlxqError

router = router_for(openai_error, tags=["responses"])


@router.post("/v1/responses")
async def create(body: ResponsesRequest, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    """OpenAI's Responses API; `stream: true` for its server-sent events."""
    redis = request.app.state.redis
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id:
        earlier = await run_in_threadpool(response_store.conversation, redis, body.previous_response_id, client)
    generate = body.to_generate(earlier)
    idem = submission.idempotency(request, body.model_dump_json(), "")
    done = await submission.accept(gw, client, [generate], "interactive", idem)
    job_id = done.ids[0]
    shapes = Shapes(job_id, body)
    headers = {**done.headers(), "x-mlxq-job-id": job_id}
    if body.hosted_tools():
        headers["x-mlxq-unavailable-tools"] = ",".join(body.hosted_tools())
    record = None
    if body.store:
        record = response_store.new_record(shapes, client.tag, job_id, [*earlier, *body.input_items()])
        await run_in_threadpool(response_store.save, redis, record, gw.settings.response_ttl_s)
    if body.stream:
        events = _events(request, shapes, job_id, record, buffered=generate.offers_tools())
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    result = await waiting.result(request, job_id)
    if record is not None:
        await run_in_threadpool(response_store.finish, redis, record, shapes, result, gw.settings.response_ttl_s)
    return JSONResponse(shapes.response("completed", shapes.output(result), result), headers=headers)


@router.get("/v1/responses/{response_id}")
def retrieve(response_id: str, client: ClientDep, redis: RedisDep) -> dict[str, Any]:
    """A stored response, as it is now."""
    found: dict[str, Any] = response_store.load(redis, response_id, client)["response"]
    return found


@router.get("/v1/responses/{response_id}/input_items")
def input_items(response_id: str, client: ClientDep, redis: RedisDep) -> dict[str, Any]:
    """The items a stored response was made from (those of the responses it continues included)."""
    items = response_store.load(redis, response_id, client)["items"]
    return {"object": "list", "data": items, "first_id": None, "last_id": None, "has_more": False}


@router.delete("/v1/responses/{response_id}")
def delete(response_id: str, client: ClientDep, redis: RedisDep) -> dict[str, Any]:
    """Forget a stored response (a job still running for it goes on)."""
    response_store.load(redis, response_id, client)
    redis.delete(keys.response(response_id))
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel")
def cancel(response_id: str, client: ClientDep, gw: GatewayDep, redis: RedisDep) -> dict[str, Any]:
    """Stop a stored response that is still being generated."""
    record = response_store.load(redis, response_id, client)
    if record["response"]["status"] != "in_progress":
        raise InvalidRequest(
            f"Response '{response_id}' is {record['response']['status']}; only one in progress can be cancelled",
            param="response_id",
        )
    try:
        jobs.cancel(jobs.fetch(record["job_id"], redis), redis, gw.settings.stream_ttl_s)
    except MlxqError:
        pass  # it ended meanwhile: the record says how when read again
    response_store.end_without_output(redis, record, "cancelled", {}, gw.settings.response_ttl_s)
    cancelled: dict[str, Any] = record["response"]
    return cancelled


async def _events(
    request: Request, shapes: Shapes, job_id: str, record: dict[str, Any] | None, buffered: bool
) -> AsyncIterator[str]:
    settings = request.app.state.settings
    redis = request.app.state.redis
    yield shapes.event("response.created", response=shapes.response("in_progress", []))
    yield shapes.event("response.in_progress", response=shapes.response("in_progress", []))
    streamed: str | None = None  # the message's text so far, once its item is open
    ended = False
    try:
        async for entry in follow(request.app.state.aredis, job_id, pings=True):
            if entry.kind == "ping":
                yield ": ping\n\n"
            elif entry.kind == "text" and not buffered and entry.data["text"]:
                if streamed is None:
                    for line in _open_message(shapes):
                        yield line
                    streamed = ""
                streamed += entry.data["text"]
                yield shapes.event(
                    "response.output_text.delta",
                    item_id=shapes.message_id,
                    output_index=0,
                    content_index=0,
                    delta=entry.data["text"],
                    logprobs=[],
                )
            elif entry.kind == "end":
                ended = True
                if entry.data["status"] != "finished":
                    error = waiting.failure(entry.data).to_dict()
                    if record is not None:
                        status = "cancelled" if entry.data["status"] == "canceled" else "failed"
                        await run_in_threadpool(
                            response_store.end_without_output, redis, record, status, error, settings.response_ttl_s
                        )
                    yield shapes.event("response.failed", response=shapes.failed(error))
                    return
                result = entry.data["result"]
                for line in _close(shapes, result, streamed):
                    yield line
                final = shapes.response("completed", shapes.output(result), result)
                if record is not None:
                    await run_in_threadpool(
                        response_store.finish, redis, record, shapes, result, settings.response_ttl_s
                    )
                kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                yield shapes.event(kind, response=final)
    finally:
        if not ended:
            waiting.cancel_quietly(request, job_id)


def _open_message(shapes: Shapes) -> list[str]:
    return [
        shapes.event("response.output_item.added", output_index=0, item=shapes.message("", "in_progress")),
        shapes.event(
            "response.content_part.added",
            item_id=shapes.message_id,
            output_index=0,
            content_index=0,
            part=shapes.text_part(""),
        ),
    ]


def _close(shapes: Shapes, result: dict[str, Any], streamed: str | None) -> list[str]:
    """The events that end the output: the message's (opened now if its text was held back), then each
    function call's."""
    lines: list[str] = []
    output = shapes.output(result)
    for index, item in enumerate(output):
        if item["type"] == "message":
            text = result["text"]
            if streamed is None:
                lines += _open_message(shapes)
                if text:
                    lines.append(
                        shapes.event(
                            "response.output_text.delta",
                            item_id=shapes.message_id,
                            output_index=index,
                            content_index=0,
                            delta=text,
                            logprobs=[],
                        )
                    )
            where = {"item_id": shapes.message_id, "output_index": index, "content_index": 0}
            lines.append(shapes.event("response.output_text.done", **where, text=text, logprobs=[]))
            lines.append(shapes.event("response.content_part.done", **where, part=shapes.text_part(text)))
        else:
            lines.append(
                shapes.event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            where = {"item_id": item["id"], "output_index": index}
            lines.append(shapes.event("response.function_call_arguments.delta", **where, delta=item["arguments"]))
            lines.append(
                shapes.event(
                    "response.function_call_arguments.done", **where, arguments=item["arguments"], name=item["name"]
                )
            )
        lines.append(shapes.event("response.output_item.done", output_index=index, item=item))
    return lines
