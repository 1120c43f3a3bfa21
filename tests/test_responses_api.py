"""OpenAI's Responses API through the official `openai` SDK, against a real gateway, worker and Redis."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.support.processes import Service

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture
def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0)


def test_create_plain_and_streamed_give_the_same_text(client: openai.OpenAI) -> None:
    asked = {"model": "tiny", "input": "Hello", "instructions": "Be brief.", "max_output_tokens": 8, "temperature": 0}
    reply = client.responses.create(**asked)  # type: ignore[call-overload]
    assert reply.object == "response" and reply.status in ("completed", "incomplete")
    assert reply.usage is not None and reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 8
    events = list(client.responses.create(**asked, stream=True))  # type: ignore[call-overload]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == reply.output_text == events[-1].response.output_text


def test_a_forced_function_call_and_its_output_in_the_next_turn(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="tiny",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=200,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])  # type: ignore[arg-type]
    follow_up = client.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=4,
    )
    assert follow_up.previous_response_id == first.id and follow_up.status in ("completed", "incomplete")
    items = client.responses.input_items.list(follow_up.id).data
    assert [item.type for item in items][-2:] == ["function_call", "function_call_output"]


def test_a_streamed_function_call_arrives_as_argument_deltas(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="tiny",
            input="Weather?",
            tools=[WEATHER],
            tool_choice="required",
            stream=True,  # type: ignore[list-item]
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    # The demo model samples: the city may be any string, even empty; the schema makes it present.
    assert deltas == done.item.arguments and isinstance(json.loads(deltas)["city"], str)


def test_stored_responses_are_kept_read_and_deleted_and_unstored_ones_are_not(client: openai.OpenAI) -> None:
    kept = client.responses.create(model="tiny", input="Hi", max_output_tokens=3)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    unstored = client.responses.create(model="tiny", input="Hi", max_output_tokens=3, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="Hi", previous_response_id=unstored.id)


def test_a_json_schema_text_format_is_enforced(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    reply = client.responses.create(
        model="tiny",
        input="Answer in JSON",
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        max_output_tokens=40,
    )
    jsonschema.validate(json.loads(reply.output_text), schema)


def test_a_running_stored_response_can_be_cancelled(service: Service, client: openai.OpenAI) -> None:
    body = {"model": "tiny", "input": "Go on", "max_output_tokens": 30_000, "stream": True}
    with httpx.stream("POST", service.base_url + "/v1/responses", json=body, timeout=30) as response:
        lines = response.iter_lines()
        created = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))
        response_id = created["response"]["id"]
        cancelled = client.responses.cancel(response_id)
        assert cancelled.status == "cancelled"
        failed = [json.loads(line[6:]) for line in lines if line.startswith("data: ")][-1]
    assert failed["type"] == "response.failed"
    assert client.responses.retrieve(response_id).status == "cancelled"


def test_codex_clis_request_shape_is_accepted(service: Service) -> None:
    """What Codex CLI 0.17x sends: developer messages, namespace and hosted tools, reasoning,
    include, store false, prompt_cache_key and client_metadata."""
    function = {k: v for k, v in WEATHER.items() if k != "strict"}
    body = {
        "model": "tiny",
        "stream": True,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "say hi"}]},
        ],
        "tools": [
            {**function, "strict": False},
            {
                "type": "namespace",
                "name": "agents",
                "description": "Sub-agents",
                "tools": [{**function, "name": "spawn"}],
            },
            {"type": "web_search", "external_web_access": False},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session-1",
        "client_metadata": {"turn_id": "t1"},
        "max_output_tokens": 4,
    }
    with httpx.stream("POST", service.base_url + "/v1/responses", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["x-mlxq-unavailable-tools"] == "web_search"
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
