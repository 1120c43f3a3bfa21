"""Answers stream token by token whether or not tools are offered; reasoning and tool calls arrive apart
from the text on every protocol, and no marker leaks. Scripted models (tests/scripted_model.py) think
or call a tool for real, through the real gateway, worker and Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.scripted_model import CALLER, THINKER
from tests.support.processes import Service

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "How many?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
REASONING = "".join(THINKER[1:3])
ANSWER = "".join(THINKER[4:])
MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


@pytest.fixture
def oai(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0)


def no_markers(*texts: str | None) -> None:
    for text in texts:
        assert not any(marker in (text or "") for marker in MARKERS), text


def test_openai_chat_reasoning_arrives_apart_streamed_and_not(oai: openai.OpenAI) -> None:
    asked: dict[str, Any] = {"model": "thinker", "messages": HI, "max_tokens": 20, "temperature": 0}
    reply = oai.chat.completions.create(**asked)
    message = reply.choices[0].message
    assert message.content == ANSWER and message.reasoning_content == REASONING  # type: ignore[attr-defined]
    chunks = list(oai.chat.completions.create(**asked, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [
        str(getattr(d, "reasoning_content", "") or "") for d in deltas if getattr(d, "reasoning_content", None)
    ]
    content = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(reasoning) == REASONING and "".join(content) == ANSWER
    assert len(reasoning) >= 2 and len(content) >= 2  # token by token, not in one piece
    no_markers(*content, *reasoning)


def test_openai_chat_streams_text_token_by_token_with_tools_offered(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="thinker",
            messages=HI,
            max_tokens=20,
            temperature=0,
            tools=[WEATHER],
            stream=True,  # type: ignore[list-item]
        )
    )
    content = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(content) == ANSWER and len(content) >= 2


def test_openai_chat_a_tool_call_streams_as_call_deltas_with_nothing_in_content(oai: openai.OpenAI) -> None:
    asked: dict[str, Any] = {"model": "caller", "messages": HI, "max_tokens": 20, "temperature": 0, "tools": [WEATHER]}
    chunks = list(oai.chat.completions.create(**asked, stream=True))
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert calls[0].id and calls[0].function and calls[0].function.name == "get_weather"
    arguments = "".join(call.function.arguments or "" for call in calls if call.function)
    assert json.loads(arguments) == {"city": "Paris"} and len(calls) >= 3  # the arguments as they form
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    reply = oai.chat.completions.create(**asked)
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.arguments == arguments and not reply.choices[0].message.content  # type: ignore[union-attr]


def test_a_qwen3_coder_xml_call_is_a_tool_call_streamed_or_not_with_no_markup_in_content(
    oai: openai.OpenAI,
) -> None:
    """Qwen3-Coder writes its calls as XML (<function=...><parameter=...>); mlx-lm's own parser for
    the family reads them, and the call goes back into the conversation in the family's format."""
    asked: dict[str, Any] = {"model": "coder", "messages": HI, "max_tokens": 20, "temperature": 0, "tools": [WEATHER]}
    chunks = list(oai.chat.completions.create(**asked, stream=True))
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert calls[0].id and calls[0].function and calls[0].function.name == "get_weather"
    arguments = "".join(call.function.arguments or "" for call in calls if call.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    reply = oai.chat.completions.create(**asked)
    [call] = reply.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Paris"} and not reply.choices[0].message.content  # type: ignore[union-attr]
    after = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    answered = oai.chat.completions.create(**{**asked, "messages": after})
    assert answered.usage and answered.usage.prompt_tokens > 0


def test_gpt_oss_channels_stream_as_reasoning_text_and_calls_with_no_header_in_content(oai: openai.OpenAI) -> None:
    """gpt-oss writes harmony: its analysis channel is reasoning, its final channel the answer, a
    commentary message to a function a call (worker/harmony.py)."""
    asked: dict[str, Any] = {"model": "oss", "messages": HI, "max_tokens": 20, "temperature": 0, "tools": [WEATHER]}
    chunks = list(oai.chat.completions.create(**asked, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(str(getattr(d, "reasoning_content", "") or "") for d in deltas)
    content = [d.content for d in deltas if d.content]
    assert reasoning == "Let me count." and "".join(content) == ANSWER and len(content) >= 2
    reply = oai.chat.completions.create(**asked)
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].message.reasoning_content == "Let me count."  # type: ignore[attr-defined]

    called = oai.chat.completions.create(**{**asked, "model": "oss-caller"})
    [call] = called.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert not called.choices[0].message.content and called.choices[0].finish_reason == "tool_calls"


def test_gemma4_thinks_in_its_thought_channel_and_calls_in_its_own_syntax(oai: openai.OpenAI) -> None:
    """Gemma 4's `<|channel>thought ... <channel|>` is reasoning and `<|tool_call>call:name{...}` a call,
    read by mlx-lm's markers and parser for the family; nothing of either reaches content."""
    asked: dict[str, Any] = {"model": "gemma-caller", "messages": HI, "max_tokens": 20, "tools": [WEATHER]}
    for streamed in (True, False):
        if streamed:
            chunks = list(oai.chat.completions.create(**asked, temperature=0, stream=True))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            reasoning = "".join(str(getattr(d, "reasoning_content", "") or "") for d in deltas)
            content = "".join(d.content or "" for d in deltas)
            calls = [call for d in deltas for call in d.tool_calls or []]
            name = calls[0].function.name if calls and calls[0].function else None
            arguments = "".join(call.function.arguments or "" for call in calls if call.function)
        else:
            message = oai.chat.completions.create(**asked, temperature=0).choices[0].message
            reasoning, content = str(getattr(message, "reasoning_content", "")), message.content or ""
            [call] = message.tool_calls or []
            name, arguments = call.function.name, call.function.arguments  # type: ignore[union-attr]
        assert reasoning.strip() == "Weather needs a tool." and content == ""
        assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}


def test_a_forced_call_cut_by_max_tokens_is_still_a_call(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model="tiny",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=4,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]


def test_anthropic_thinking_text_and_tool_use_blocks_stream_in_order(service: Service) -> None:
    client = anthropic.Anthropic(base_url=service.base_url, api_key="unused", max_retries=0)
    with client.messages.stream(model="thinker", max_tokens=20, messages=HI) as stream:  # type: ignore[arg-type]
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == REASONING and final.content[1].text == ANSWER  # type: ignore[union-attr]
    assert kinds.count("content_block_start") == 2
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]
    with client.messages.stream(model="caller", max_tokens=20, messages=HI, tools=[tool]) as stream:  # type: ignore[arg-type, list-item]
        deltas = [e for e in stream if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        called = stream.get_final_message()
    [use] = called.content
    assert use.type == "tool_use" and use.input == {"city": "Paris"} and len(deltas) >= 2
    assert called.stop_reason == "tool_use"
    stopped = client.messages.create(model="thinker", max_tokens=20, messages=HI, stop_sequences=[" four"])  # type: ignore[arg-type]
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " four"


def test_ollama_thinking_and_tool_calls(service: Service) -> None:
    client = ollama.Client(host=service.base_url)
    parts = list(client.chat(model="thinker", messages=HI, stream=True, think=True, options={"temperature": 0}))
    assert "".join(p.message.thinking or "" for p in parts) == REASONING
    assert "".join(p.message.content or "" for p in parts) == ANSWER
    whole = client.chat(model="thinker", messages=HI, think=True, options={"temperature": 0})
    assert whole.message.thinking == REASONING and whole.message.content == ANSWER
    called = client.chat(model="caller", messages=HI, tools=[WEATHER], options={"temperature": 0})
    [call] = called.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    no_markers(called.message.content)


def test_responses_reasoning_items_and_streamed_function_calls(oai: openai.OpenAI) -> None:
    reply = oai.responses.create(model="thinker", input="How many?", max_output_tokens=20, temperature=0)
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output_text == ANSWER
    assert reply.output[0].content[0].text == REASONING  # type: ignore[union-attr, index]
    events = list(oai.responses.create(model="thinker", input="How many?", max_output_tokens=20, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == REASONING
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    tool = {"type": "function", **WEATHER["function"]}  # type: ignore[dict-item]
    called = list(oai.responses.create(model="caller", input="Weather?", tools=[tool], stream=True))  # type: ignore[list-item]
    deltas = [e.delta for e in called if e.type == "response.function_call_arguments.delta"]
    [done] = [e.item for e in called if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert json.loads("".join(deltas)) == {"city": "Paris"} == json.loads(done.arguments) and len(deltas) >= 2
    assert not any(e.type == "response.output_text.delta" for e in called)


def test_a_models_file_can_turn_the_split_off(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="thinker-raw", messages=HI, max_tokens=20)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "".join(THINKER)
    assert not getattr(reply.choices[0].message, "reasoning_content", None)


def test_native_jobs_report_reasoning_apart(service: Service) -> None:
    job = service.submit(model="thinker", messages=HI, max_tokens=20, temperature=0)
    done = service.wait_for(job["id"], {"finished"})
    assert done["result"]["reasoning"] == REASONING and done["result"]["text"] == ANSWER
    assert CALLER  # the scripts are the tests' own


def test_an_answer_with_tools_offered_streams_about_a_piece_a_token(service: Service) -> None:
    body = {
        "model": "tiny",
        "messages": HI,
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [WEATHER],
    }
    pieces: list[float] = []
    tokens = 0
    with httpx.stream("POST", service.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                pieces.append(time.monotonic())
        ended = time.monotonic()
    # A random model's tokens are often parts of a character (held until it is whole): about a piece
    # a token, not one piece at the end.
    assert tokens == 300 and len(pieces) >= tokens // 2
    assert pieces[0] < pieces[-1] < ended


def test_anthropics_thinking_budget_caps_the_reasoning(service: Service) -> None:
    client = anthropic.Anthropic(base_url=service.base_url, api_key="unused", max_retries=0)
    reply = client.messages.create(
        model="thinker",
        max_tokens=20,
        messages=HI,  # type: ignore[list-item]
        thinking={"type": "enabled", "budget_tokens": 1},
    )
    # One token of thinking, then its end marker is forced; the scripted answer follows the marker.
    [thinking, text] = reply.content
    assert thinking.type == "thinking" and thinking.thinking == THINKER[1]  # type: ignore[union-attr]
    assert text.type == "text" and text.text == ANSWER  # type: ignore[union-attr]
