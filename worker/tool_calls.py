"""Tool calls out of a finished row's text, in OpenAI's shape.

A forced call (`tool_choice: required` or a named function) was generated under a JSON
schema, so the whole text is `{"name": ..., "arguments": {...}}`. Otherwise (`auto`) the
model writes calls in its own format between its tool-call markers; mlx-lm knows the
markers and the parser of each model family it supports, and `<tool_call>...</tool_call>`
with JSON inside (Hermes, Qwen, the demo model) is the fallback.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from uuid import uuid4

from shared.schemas import GenerateRequest

logger = logging.getLogger(__name__)

_DEFAULT_MARKERS = ("<tool_call>", "</tool_call>")


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def tool_calls_in(text: str, request: GenerateRequest, tokenizer: Any) -> tuple[str, list[dict[str, Any]] | None]:
    """(the text left for `content`, the calls) of a row that ended on its own; (text, None) without calls."""
    if not request.offers_tools():
        return text, None
    if request.forced_call_schema() is not None:
        try:
            call = json.loads(text)
        except ValueError:
            return text, None  # cut short by max_tokens: no complete call to report
        return "", [_call(call["name"], call["arguments"])]
    start = getattr(tokenizer, "tool_call_start", None) or _DEFAULT_MARKERS[0]
    end = getattr(tokenizer, "tool_call_end", None) or _DEFAULT_MARKERS[1]
    parser = getattr(tokenizer, "tool_parser", None)
    tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
    calls: list[dict[str, Any]] = []
    for body in re.findall(re.escape(start) + r"(.*?)" + (re.escape(end) if end else "$"), text, flags=re.S):
        try:
            parsed = parser(body, tools) if parser is not None else json.loads(body.strip())
        except Exception:
            logger.info("a tool call the model wrote could not be parsed; it stays in the text")
            continue
        for one in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(one, dict) and isinstance(one.get("name"), str):
                calls.append(_call(one["name"], one.get("arguments", {})))
    if not calls:
        return text, None
    if not request.parallel_tool_calls:
        calls = calls[:1]
    content = re.sub(re.escape(start) + r".*?" + (re.escape(end) if end else "$"), "", text, flags=re.S).strip()
    return content, calls
