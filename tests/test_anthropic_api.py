"""Anthropic's Messages API through the official `anthropic` SDK, against a real gateway and worker."""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

from tests.support import Service

pytestmark = pytest.mark.slow

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture
def client(service: Service) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=service.base_url, api_key="unused")


def test_messages_create_plain_and_streamed(client: anthropic.Anthropic) -> None:
    asked = {
        "model": "demo",
        "max_tokens": 6,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "extra_body": {"temperature": 0},  # this SDK version no longer takes it as an argument
    }
    reply = client.messages.create(**asked)  # type: ignore[arg-type]
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.stop_reason in ("max_tokens", "end_turn") and reply.usage.output_tokens <= 6
    text = "".join(block.text for block in reply.content if block.type == "text")
    with client.messages.stream(**asked) as stream:  # type: ignore[arg-type]
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.stop_reason == reply.stop_reason


def test_messages_with_a_forced_tool_and_the_tool_result_turn(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(
        model="demo",
        max_tokens=200,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    [use] = [block for block in reply.content if block.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER["input_schema"])  # type: ignore[arg-type]
    follow_up = client.messages.create(
        model="demo",
        max_tokens=4,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ],
    )
    assert follow_up.stop_reason in ("max_tokens", "end_turn", "tool_use")


def test_errors_have_anthropics_shape(service: Service) -> None:
    response = httpx.post(service.base_url + "/v1/messages", json={"model": "demo", "messages": []})
    assert response.status_code == 422
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
