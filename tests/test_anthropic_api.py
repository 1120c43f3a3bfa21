"""Anthropic's Messages API through the official `anthropic` SDK, against a real gateway and worker."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.support.processes import Service

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
        "model": "tiny",
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
        model="tiny",
        max_tokens=200,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    [use] = [block for block in reply.content if block.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER["input_schema"])  # type: ignore[arg-type]
    follow_up = client.messages.create(
        model="tiny",
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


def test_errors_have_anthropics_shape_and_status(service: Service) -> None:
    response = httpx.post(service.base_url + "/v1/messages", json={"model": "tiny", "messages": []})
    assert response.status_code == 400  # Anthropic's status for an invalid request (mlxq's own routes: 422)
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    unknown = httpx.post(service.base_url + "/v1/messages", json={"model": "nope", "max_tokens": 4, "messages": [HI]})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    odd = httpx.post(
        service.base_url + "/v1/messages",
        json={"model": "tiny", "max_tokens": 4, "messages": [HI], "context_management": {"edits": [{"type": "x"}]}},
    )
    assert odd.status_code == 400 and "context_management" in odd.json()["error"]["message"]


HI = {"role": "user", "content": "Hi"}


def test_claude_codes_request_shape_is_accepted(service: Service) -> None:
    """What Claude Code 2.1 sends: a system message among the messages, thinking, output_config,
    context_management, a large max_tokens (a ceiling) and ?beta=true."""
    body = {
        "model": "tiny",
        "max_tokens": 64000,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [HI, {"role": "system", "content": "The date is 2026-12-01."}, {"role": "user", "content": "Go"}],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "someone"},
        "temperature": 0,
    }
    url = service.base_url + "/v1/messages?beta=true"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        # A ceiling: 64000 does not fit the demo model's context of 32768 beside the prompt.
        assert 32000 < int(response.headers["x-mlxq-max-tokens"]) < 32768
        lines = response.iter_lines()
        assert next(lines) == "event: message_start"
    # Hanging up here cancels the job: it would run to the ceiling.
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 10}}, "required": ["title"]}
    titled = httpx.post(
        service.base_url + "/v1/messages",
        json={**body, "max_tokens": 60, "output_config": {"format": {"type": "json_schema", "schema": schema}}},
        timeout=60,
    )
    assert titled.status_code == 200, titled.text
    [block] = titled.json()["content"]
    jsonschema.validate(json.loads(block["text"]), schema)


def test_input_tokens_are_the_prompt_as_the_model_sees_it_in_every_count(client: anthropic.Anthropic) -> None:
    asked = {"model": "tiny", "max_tokens": 3, "system": "Be brief.", "messages": [HI], "tools": [WEATHER]}
    reply = client.messages.create(**asked)  # type: ignore[arg-type]
    counted = client.messages.count_tokens(**{k: v for k, v in asked.items() if k != "max_tokens"})  # type: ignore[arg-type]
    with client.messages.stream(**asked) as stream:  # type: ignore[arg-type]
        started = next(event for event in stream if event.type == "message_start")
        final = stream.get_final_message()
    # Anthropic's split: computed, read from a cache, written to one; together the prompt (the second call's
    # prompt is read from what the first kept).
    assert total(reply.usage) > 50  # the tool's schema is in the prompt
    assert counted.input_tokens == total(reply.usage) == total(started.message.usage) == total(final.usage)
    assert final.usage.cache_read_input_tokens and final.usage.cache_read_input_tokens >= 0.9 * counted.input_tokens


def total(usage: anthropic.types.Usage) -> int:
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


SHARED_SYSTEM = " ".join(f"Rule {i}: answer in plain words about the repository and its files." for i in range(40))


def test_sessions_that_differ_only_in_claude_codes_attribution_line_share_their_prompt(
    client: anthropic.Anthropic,
) -> None:
    """Claude Code's first system block is an attribution line that changes with its version, session and
    sub-agent: left in, no two sessions would share a kept prefix. It is left out of the prompt, so a second
    session reads the shared system prompt from the first's cache, and Claude Code is told so."""

    def session(cch: str, question: str) -> anthropic.types.Message:
        attribution = f"x-anthropic-billing-header: cc_version=2.1.197.{cch[:3]}; cc_entrypoint=cli; cch={cch};"
        system = [{"type": "text", "text": attribution}, {"type": "text", "text": SHARED_SYSTEM}]
        asked = {
            "model": "tiny",
            "max_tokens": 3,
            "system": system,
            "messages": [{"role": "user", "content": question}],
        }
        return client.messages.create(**asked)  # type: ignore[arg-type]

    first = session("a1b2c", "Which file holds the settings?")
    second = session("f9e8d", "Which file holds the tests?")
    plain = client.messages.create(
        model="tiny",
        max_tokens=3,
        system=SHARED_SYSTEM,
        messages=[{"role": "user", "content": "Which file holds the tests?"}],
    )
    assert total(second.usage) == total(plain.usage)  # the attribution line is not in the prompt
    assert first.usage.cache_read_input_tokens is not None
    assert second.usage.cache_read_input_tokens is not None
    assert second.usage.cache_read_input_tokens >= 0.8 * total(second.usage)
    assert second.usage.input_tokens == total(second.usage) - second.usage.cache_read_input_tokens
