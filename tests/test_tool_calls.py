"""Tool calls parsed out of a model's text (worker/tool_calls.py)."""

from __future__ import annotations

import json
from typing import Any

from shared.schemas import GenerateRequest
from worker.tool_calls import tool_calls_in

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def request(**extra: Any) -> GenerateRequest:
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "tools": [TOOL], **extra}
    return GenerateRequest.model_validate(body)


class NoToolMarkers:
    """A tokenizer mlx-lm knows no tool-call format for: the <tool_call> fallback applies."""


def test_auto_calls_in_the_models_text_become_tool_calls_and_leave_the_rest_as_content() -> None:
    text = 'Let me check. <tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
    content, calls = tool_calls_in(text + text[13:], request(), NoToolMarkers())
    assert content == "Let me check."
    assert calls is not None and [c["function"]["name"] for c in calls] == ["get_time", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}
    _, single = tool_calls_in(text + text[13:], request(parallel_tool_calls=False), NoToolMarkers())
    assert single is not None and len(single) == 1


def test_text_without_calls_or_with_a_broken_one_stays_text() -> None:
    assert tool_calls_in("Just words.", request(), NoToolMarkers()) == ("Just words.", None)
    broken = "<tool_call>{not json</tool_call>"
    assert tool_calls_in(broken, request(), NoToolMarkers()) == (broken, None)
    assert tool_calls_in('<tool_call>{"name": "get_time"}</tool_call>', request(tool_choice="none"), None)[1] is None
