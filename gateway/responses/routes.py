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
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.admission import submission
from gateway.deps import ClientDep, GatewayDep, RedisDep
from gateway.error_shapes import openai_error, router_for
from gateway.http.streaming import StreamingResponse
from gateway.jobs import records
from gateway.responses import store
from gateway.responses.shapes import ResponsesRequest, Shapes
from gateway.streams import waiting
from shared import keys
from shared.errors import InvalidRequest, MlxqError

router = router_for(openai_error, tags=["responses"])


@router.post("/v1/responses")
async def create(body: ResponsesRequest, request: Request, client: ClientDep, gw: GatewayDep) -> Response:
    """OpenAI's Responses API; `stream: true` for its server-sent events."""
    redis = request.app.state.redis
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id:
        earlier = await run_in_threadpool(store.conversation, redis, body.previous_response_id, client)
    generate = body.to_generate(earlier)
    idem = submission.idempotency(request, body.model_dump_json(), "")
    done = await submission.accept(gw, client, [generate], "interactive", idem, streamed=bool(body.stream))
    job_id = done.ids[0]
    shapes = Shapes(job_id, body)
    headers = {**done.headers(), "x-mlxq-job-id": job_id}
    if body.hosted_tools():
        headers["x-mlxq-unavailable-tools"] = ",".join(body.hosted_tools())
    record = None
    if body.store:
        record = store.new_record(shapes, client.tag, job_id, [*earlier, *body.input_items()])
        await run_in_threadpool(store.save, redis, record, gw.settings.response_ttl_s)
    if body.stream:
        events = _events(request, shapes, job_id, record)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    result = await waiting.result(request, job_id)
    if record is not None:
        await run_in_threadpool(store.finish, redis, record, shapes, result, gw.settings.response_ttl_s)
    return JSONResponse(shapes.response("completed", shapes.output(result), result), headers=headers)


@router.get("/v1/responses/{response_id}")
def retrieve(response_id: str, client: ClientDep, redis: RedisDep) -> dict[str, Any]:
    """A stored response, as it is now."""
    found: dict[str, Any] = store.load(redis, response_id, client)["response"]
    return found


@router.get("/v1/responses/{response_id}/input_items")
def input_items(response_id: str, client: ClientDep, redis: RedisDep) -> dict[str, Any]:
    """The items a stored response was made from (those of the responses it continues included)."""
    items = store.load(redis, response_id, client)["items"]
    return {"object": "list", "data": items, "first_id": None, "last_id": None, "has_more": False}


@router.delete("/v1/responses/{response_id}")
def delete(response_id: str, client: ClientDep, redis: RedisDep) -> dict[str, Any]:
    """Forget a stored response (a job still running for it goes on)."""
    store.load(redis, response_id, client)
    redis.delete(keys.response(response_id))
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel")
def cancel(response_id: str, client: ClientDep, gw: GatewayDep, redis: RedisDep) -> dict[str, Any]:
    """Stop a stored response that is still being generated."""
    record = store.load(redis, response_id, client)
    if record["response"]["status"] != "in_progress":
        raise InvalidRequest(
            f"Response '{response_id}' is {record['response']['status']}; only one in progress can be cancelled",
            param="response_id",
        )
    try:
        records.cancel(records.fetch(record["job_id"], redis), redis, gw.settings.stream_ttl_s)
    except MlxqError:
        pass  # it ended meanwhile: the record says how when read again
    store.end_without_output(redis, record, "cancelled", {}, gw.settings.response_ttl_s)
    cancelled: dict[str, Any] = record["response"]
    return cancelled


async def _events(request: Request, shapes: Shapes, job_id: str, record: dict[str, Any] | None) -> AsyncIterator[str]:
    settings = request.app.state.settings
    redis = request.app.state.redis
    yield shapes.event("response.created", response=shapes.response("in_progress", []))
    yield shapes.event("response.in_progress", response=shapes.response("in_progress", []))
    items = _Items(shapes)
    async with waiting.streamed(request, job_id) as entries:
        async for entry in entries:
            if entry.kind == "ping":
                yield ": ping\n\n"
            elif entry.kind in ("text", "reasoning", "call", "arguments"):
                for line in items.piece(entry.kind, entry.data):
                    yield line
            elif entry.kind == "end":
                if entry.data["status"] != "finished":
                    error = waiting.failure(entry.data).to_dict()
                    if record is not None:
                        status = "cancelled" if entry.data["status"] == "canceled" else "failed"
                        await run_in_threadpool(
                            store.end_without_output, redis, record, status, error, settings.response_ttl_s
                        )
                    yield shapes.event("response.failed", response=shapes.failed(error))
                    return
                result = entry.data["result"]
                for line in items.close(result):
                    yield line
                final = shapes.response("completed", items.output, result)
                if record is not None:
                    await run_in_threadpool(
                        store.finish, redis, record, shapes, result, settings.response_ttl_s, items.output
                    )
                kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                yield shapes.event(kind, response=final)


class _Items:
    """The output items of a streamed response, opened as their first piece arrives: reasoning,
    the message, each function call (its arguments as they form)."""

    def __init__(self, shapes: Shapes) -> None:
        self.shapes = shapes
        self.output: list[dict[str, Any]] = []
        """The items in the order they were opened; complete once `close` has run."""
        self._open: dict[str, int] = {}
        """Output index by key: "reasoning", "message", or "call:<index>"."""

    def piece(self, kind: str, data: dict[str, Any]) -> list[str]:
        shapes = self.shapes
        if kind == "call":
            item = {**shapes.call_item(data["id"], data["name"], ""), "status": "in_progress"}
            return self._add(f"call:{data['index']}", item)
        if not data.get("text"):
            return []
        if kind == "arguments":
            at = self._open.get(f"call:{data['index']}", -1)
            if at < 0:
                return []  # its call's entry is missing (lost in an outage): the done event has it all
            self.output[at]["arguments"] += data["text"]
            item_id = self.output[at]["id"]
            return [
                shapes.event(
                    "response.function_call_arguments.delta", item_id=item_id, output_index=at, delta=data["text"]
                )
            ]
        key = "message" if kind == "text" else "reasoning"
        lines = [] if key in self._open else self._add(key, shapes.empty_item(key))
        at = self._open[key]
        part = self.output[at]["content"][0]
        part["text"] += data["text"]
        where = {"item_id": self.output[at]["id"], "output_index": at, "content_index": 0, "delta": data["text"]}
        if key == "message":
            return [*lines, shapes.event("response.output_text.delta", **where, logprobs=[])]
        return [*lines, shapes.event("response.reasoning_text.delta", **where)]

    def _add(self, key: str, item: dict[str, Any]) -> list[str]:
        self._open[key] = len(self.output)
        self.output.append(item)
        lines = [self.shapes.event("response.output_item.added", output_index=self._open[key], item=item)]
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": self._open[key], "content_index": 0}
            lines.append(self.shapes.event("response.content_part.added", **where, part=dict(part)))
        return lines

    def close(self, result: dict[str, Any]) -> list[str]:
        """Every item's done events, with the result's final content (items the stream never opened
        are opened now)."""
        shapes = self.shapes
        complete = shapes.output(result)
        final = {item["type"]: item for item in complete if item["type"] != "function_call"}
        final.update({f"call:{i}": item for i, item in enumerate(i for i in complete if i["type"] == "function_call")})
        lines: list[str] = []
        for key, item in final.items():
            if key not in self._open:
                opened = {**item, "status": "in_progress"} if key.startswith("call:") else shapes.empty_item(key)
                lines += self._add(key, opened)
        for key, at in sorted(self._open.items(), key=lambda pair: pair[1]):
            done = final.get(key, self.output[at])
            if done["type"] == "function_call":
                done = {**done, "id": self.output[at]["id"], "call_id": self.output[at]["call_id"]}
                lines.append(self._arguments_done(done, at))
            else:
                lines += self._text_done(done, at)
            self.output[at] = done
            lines.append(shapes.event("response.output_item.done", output_index=at, item=done))
        return lines

    def _arguments_done(self, call: dict[str, Any], at: int) -> str:
        return self.shapes.event(
            "response.function_call_arguments.done",
            item_id=call["id"],
            output_index=at,
            arguments=call["arguments"],
            name=call["name"],
        )

    def _text_done(self, item: dict[str, Any], at: int) -> list[str]:
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": at, "content_index": 0}
        if item["type"] == "message":
            done = self.shapes.event("response.output_text.done", **where, text=part["text"], logprobs=[])
        else:
            done = self.shapes.event("response.reasoning_text.done", **where, text=part["text"])
        return [done, self.shapes.event("response.content_part.done", **where, part=part)]
