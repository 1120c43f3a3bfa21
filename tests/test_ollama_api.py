"""Ollama's API through the official `ollama` client, against a real gateway, worker and Redis."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import ollama
import pytest

from tests.support.processes import Service
from tests.test_responses_api import WEATHER as TOOL

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 8}},
    "required": ["ok", "name"],
    "additionalProperties": False,
}


@pytest.fixture
def client(service: Service) -> ollama.Client:
    return ollama.Client(host=service.base_url)


def test_list_show_ps_and_version(client: ollama.Client, service: Service) -> None:
    assert "tiny" in [m.model for m in client.list().models]
    shown = client.show("tiny")
    assert shown.capabilities and shown.modelinfo and shown.modelinfo["qwen2.context_length"] == 32768
    client.generate(model="tiny", prompt="warm", options={"num_predict": 1})
    deadline = time.monotonic() + 5  # the worker's heartbeat says what it holds
    while "tiny" not in [m.model for m in client.ps().models]:
        assert time.monotonic() < deadline, client.ps()
        time.sleep(0.1)
    assert httpx.get(service.base_url + "/api/version").json()["version"]


def test_chat_and_generate_streamed_and_not(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    options = {"num_predict": 6, "temperature": 0, "seed": 1, "top_k": 5}
    whole = client.chat(model="tiny", messages=messages, options=options)
    assert whole.done and whole.eval_count == 6 and whole.done_reason == "length"
    pieces = list(client.chat(model="tiny", messages=messages, options=options, stream=True))
    assert pieces[-1].done and "".join(p.message.content for p in pieces) == whole.message.content
    generated = client.generate(model="tiny", prompt="Once", options={"num_predict": 4, "temperature": 0})
    streamed = list(
        client.generate(model="tiny", prompt="Once", options={"num_predict": 4, "temperature": 0}, stream=True)
    )
    assert "".join(p.response for p in streamed) == generated.response


def test_format_is_enforced(client: ollama.Client) -> None:
    reply = client.chat(
        model="tiny", messages=[{"role": "user", "content": "JSON"}], format=SCHEMA, options={"num_predict": 200}
    )
    jsonschema.validate(json.loads(reply.message.content), SCHEMA)


def test_num_predict_minus_one_or_two_leaves_the_limit_to_the_context() -> None:
    from gateway.ollama.shapes import GenerateBody

    for value in (-1, -2):
        body = GenerateBody.model_validate({"model": "tiny", "prompt": "Hi", "options": {"num_predict": value}})
        assert body.to_generate().max_tokens is None  # then up to the context and the cap (test_prompt_limits)


def test_an_unknown_option_is_refused_in_ollamas_error_shape(service: Service) -> None:
    body = {"model": "tiny", "prompt": "x", "options": {"mirostat": 2}, "stream": False}
    response = httpx.post(service.base_url + "/api/generate", json=body)
    assert response.status_code == 422
    assert "mirostat" in response.json()["error"]
    with pytest.raises(ollama.ResponseError) as missing:
        ollama.Client(host=service.base_url).chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404


WEATHER = {"type": "function", "function": {k: v for k, v in TOOL.items() if k not in ("type", "strict")}}
"""The Responses API tests' get_weather, in the chat completions' (and Ollama's) shape."""


def test_unknown_top_level_fields_are_ignored_as_ollama_ignores_them_and_a_forcing_tool_choice_holds(
    service: Service,
) -> None:
    """Cline's Ollama provider sends `tool_choice` (and clients send other fields Ollama never had): Ollama
    ignores what it does not know; a `tool_choice` that forces a call is honoured, not dropped."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "something_new": {"a": 1},
        "stream": False,
        "options": {"num_predict": 60, "temperature": 0},
    }
    answer = httpx.post(service.base_url + "/api/chat", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    [call] = answer.json()["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and isinstance(call["function"]["arguments"], dict)
    # `auto` is Ollama's own behaviour; the options are still checked by name.
    body = {**body, "tool_choice": "auto", "options": {"num_predict": 4, "temperature": 0}}
    assert httpx.post(service.base_url + "/api/chat", json=body, timeout=60).status_code == 200
    refused = httpx.post(service.base_url + "/api/chat", json={**body, "options": {"mirostat": 2}}, timeout=60)
    assert refused.status_code == 422 and "mirostat" in refused.json()["error"]


def test_prompt_eval_count_counts_what_was_evaluated_not_what_was_read_from_a_kept_cache(
    client: ollama.Client,
) -> None:
    prompt = "Twice " * 300
    first = client.generate(model="tiny", prompt=prompt, options={"num_predict": 2, "temperature": 0})
    again = client.generate(model="tiny", prompt=prompt, options={"num_predict": 2, "temperature": 0})
    assert first.prompt_eval_count and first.prompt_eval_count > 300
    assert again.prompt_eval_count is not None and 0 < again.prompt_eval_count < 0.1 * first.prompt_eval_count


def test_eval_duration_counts_the_decoding_alone(client: ollama.Client) -> None:
    reply = client.generate(model="tiny", prompt="Once " * 400, options={"num_predict": 4, "temperature": 0})
    assert reply.eval_count == 4 and reply.prompt_eval_count and reply.prompt_eval_count > 400
    assert reply.eval_duration and reply.prompt_eval_duration and reply.total_duration
    assert reply.load_duration is not None
    # Prefill and decoding apart, within the whole: neither holds the other.
    assert reply.prompt_eval_duration + reply.eval_duration <= reply.total_duration - reply.load_duration
