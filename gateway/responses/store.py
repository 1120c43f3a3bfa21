"""Responses kept for `previous_response_id` and `GET /v1/responses/{id}` (`store: true`).

One Redis hash-free JSON record per response, owned by the key that made it and
kept `MLXQ_RESPONSE_TTL_S`: the request (so its shape can be rebuilt), the
conversation's items up to it, its job, and the response as last known. A record
written while its job runs is completed from the job itself when read later, so a
gateway that stops mid-answer loses nothing that RQ kept.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from gateway.admission.clients import Client
from gateway.jobs import records
from gateway.responses.shapes import ResponsesRequest, Shapes, response_error
from shared import keys
from shared.errors import JobNotFound, ResponseNotFound


def save(redis: Redis, record: dict[str, Any], ttl_s: int) -> None:
    redis.set(keys.response(record["response"]["id"]), json.dumps(record), ex=ttl_s)


def new_record(shapes: Shapes, owner: str, job_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "owner": owner,
        "job_id": job_id,
        "request": shapes.body.model_dump(mode="json", by_alias=True, exclude={"input"}),
        "items": items,
        "output": None,
        "response": shapes.response("in_progress", []),
    }


def load(redis: Redis, response_id: str, client: Client, param: str = "id") -> dict[str, Any]:
    """The record, brought up to date with its job; another key's response is answered as missing."""
    raw = redis.get(keys.response(response_id))
    record: dict[str, Any] | None = json.loads(raw) if raw is not None else None
    if record is None or not client.sees(record.get("owner")):
        raise ResponseNotFound(f"No response with id '{response_id}' (it may have expired)", param=param)
    if record["response"]["status"] == "in_progress":
        _catch_up(redis, record)
    return record


def conversation(redis: Redis, response_id: str, client: Client) -> list[dict[str, Any]]:
    """The items a response continuing `response_id` starts from: its input and its output."""
    record = load(redis, response_id, client, param="previous_response_id")
    if record["output"] is None:
        status = record["response"]["status"]
        raise ResponseNotFound(
            f"Response '{response_id}' is {status}: it has no output to continue from", param="previous_response_id"
        )
    return [*record["items"], *record["output"]]


def finish(
    redis: Redis,
    record: dict[str, Any],
    shapes: Shapes,
    result: dict[str, Any],
    ttl_s: int,
    output: list[dict[str, Any]] | None = None,
) -> None:
    """The response completed with `output` (a stream's items as it showed them; else the result's)."""
    _complete(record, shapes, result, output)
    save(redis, record, ttl_s)


def _complete(
    record: dict[str, Any], shapes: Shapes, result: dict[str, Any], output: list[dict[str, Any]] | None = None
) -> None:
    record["output"] = output if output is not None else shapes.output(result)
    record["response"] = shapes.response("completed", record["output"], result)


def end_without_output(redis: Redis, record: dict[str, Any], status: str, error: dict[str, Any], ttl_s: int) -> None:
    record["response"] = {**record["response"], "status": status}
    if status == "failed":
        record["response"]["error"] = response_error(error)
    save(redis, record, ttl_s)


def shapes_of(record: dict[str, Any]) -> Shapes:
    body = ResponsesRequest.model_validate({**record["request"], "input": "-"})
    shapes = Shapes(record["job_id"], body)
    shapes.created_at = record["response"]["created_at"]
    return shapes


def _catch_up(redis: Redis, record: dict[str, Any]) -> None:
    """A record left in progress: its job may have ended since (read, not written back)."""
    try:
        view = records.view(records.fetch(record["job_id"], redis), redis)
    except JobNotFound:
        record["response"]["status"] = "failed"
        return
    if view.status == "finished" and view.result is not None:
        _complete(record, shapes_of(record), view.result.model_dump())
    elif view.status == "canceled":
        record["response"]["status"] = "cancelled"
    elif view.status == "failed":
        record["response"]["status"] = "failed"
        record["response"]["error"] = response_error(view.error or {})
