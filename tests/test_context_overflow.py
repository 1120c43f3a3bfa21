"""A prompt longer than the model's context, refused in each protocol's own words, through the real
gateway and each protocol's official client: the words agent clients match to compact a conversation."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.conftest import NARROW_CONTEXT
from tests.support.processes import Service

LONG = "the quick brown fox jumps over the lazy dog " * 60
"""Some 600 tokens: past the `narrow` model's context."""

TOOL = {
    "type": "function",
    "function": {"name": "lookup", "description": "Looks a word up. " * 80, "parameters": {"type": "object"}},
}


def test_openai_routes_answer_400_context_length_exceeded_with_the_numbers(service: Service) -> None:
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="narrow", messages=[{"role": "user", "content": LONG}], max_tokens=4)
    error = caught.value
    assert error.status_code == 400 and error.code == "context_length_exceeded" and error.param == "messages"
    assert error.response.headers.get("retry-after") is None
    message = str(error.body["message"])  # type: ignore[index]
    assert message.startswith(f"This model's maximum context length is {NARROW_CONTEXT} tokens. However, your ")
    assert "Please reduce the length of the messages." in message

    # The tool definitions alone overflow it: named as the field, with their share of the tokens.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="narrow",
            messages=[{"role": "user", "content": "Hi"}],
            tools=[TOOL],
            max_tokens=4,  # type: ignore[list-item]
        )
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "tools"
    assert "in the functions). Please reduce the length of the messages or functions." in str(
        caught.value.body["message"]  # type: ignore[index]
    )

    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="narrow", prompt=LONG, max_tokens=4)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "prompt"

    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="narrow", input=LONG, max_output_tokens=16)
    assert caught.value.code == "context_length_exceeded"


def test_anthropic_route_says_prompt_is_too_long(service: Service) -> None:
    client = anthropic.Anthropic(base_url=service.base_url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="narrow", max_tokens=4, messages=[{"role": "user", "content": LONG}])
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    counted = int(body["error"]["message"].split(": ")[1].split(" ")[0])
    assert body["error"]["message"] == f"prompt is too long: {counted} tokens > {NARROW_CONTEXT} maximum"
    assert counted > NARROW_CONTEXT


def test_ollama_route_says_so_in_its_shape(service: Service) -> None:
    answer = service.http.post(
        "/api/chat",
        json={"model": "narrow", "messages": [{"role": "user", "content": LONG}], "stream": False},
        timeout=30,
    )
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("the input length exceeds the context length: the prompt takes ")
    assert f"the model's context {NARROW_CONTEXT}" in answer.json()["error"]
