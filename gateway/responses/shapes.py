"""OpenAI's Responses API shapes (`POST /v1/responses`), translated to and from mlxq's own.

Codex CLI and the Agents SDK speak only this. `input` is a string or a list of
items: messages (text parts), `function_call` and `function_call_output` items,
and `reasoning` items (left out of the prompt, as chat templates leave out past
thinking). Function tools (and the function tools of a `namespace`) are offered
to the model; hosted tools (`web_search`, `file_search`, ...) cannot run here, so
they are not offered, and the answer's `x-mlxq-unavailable-tools` header names
them. `text.format` is enforced like `response_format`. Fields that cannot change
the text are accepted (`reasoning`, `include`, `metadata`, `prompt_cache_key`,
`user`, `store`, ...); anything else unknown is refused by name.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.http.json_answer import json_text
from shared.errors import InvalidRequest
from shared.schemas import GenerateRequest

HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "file_search",
        "code_interpreter",
        "image_generation",
        "computer_use_preview",
        "computer_use",
        "mcp",
        "local_shell",
        "shell",
        "custom",
        "apply_patch",
    }
)
"""Tool types a local model cannot call here: not offered, and named in a header."""

INCLUDABLE = frozenset(
    {
        "reasoning.encrypted_content",
        "web_search_call.action.sources",
        "web_search_call.results",
        "file_search_call.results",
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "message.input_image.image_url",
    }
)
"""`include` values that add nothing here (no hosted tool runs, no image is read)."""


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed", "none"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    """The body of `POST /v1/responses`."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stream: bool = False
    store: bool = True
    previous_response_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    client_metadata: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: Literal[False] | None = None

    def hosted_tools(self) -> list[str]:
        """The tools asked for that cannot run here (not offered to the model)."""
        return sorted({str(t.get("type")) for t in self.tools or [] if t.get("type") in HOSTED_TOOLS})

    def to_generate(self, earlier: list[dict[str, Any]]) -> GenerateRequest:
        """mlxq's request; `earlier` holds the items of the responses this one continues."""
        for value in self.include or []:
            if value not in INCLUDABLE:
                raise InvalidRequest(f"include: {value!r} is not supported by mlxq", param="include")
        messages = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        messages += chat_messages([*earlier, *self.input_items()])
        if not messages:
            raise InvalidRequest("input has no message for the model", param="input")
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        # Only what the request sets: the rest is the model's default (shared/models.py), then mlxq's.
        for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
            if theirs in self.model_fields_set and getattr(self, theirs) is not None:
                fields[ours] = getattr(self, theirs)
        tools = function_tools(self.tools or [])
        if tools:
            fields["tools"] = tools
            fields["tool_choice"] = _tool_choice(self.tool_choice)
        elif self.tool_choice not in (None, "auto", "none"):
            raise InvalidRequest("tool_choice needs a function tool among `tools`", param="tool_choice")
        schema = self._schema()
        if schema is not None:
            fields["json_schema"] = schema
        return GenerateRequest.model_validate(fields)

    def input_items(self) -> list[dict[str, Any]]:
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return self.input

    def _schema(self) -> dict[str, Any] | None:
        form = self.text.format if self.text else None
        if form is None or form.type == "text":
            return None
        if form.type == "json_object":
            return {"type": "object"}
        if form.schema_ is None:
            raise InvalidRequest("text.format.schema is required with type json_schema", param="text.format.schema")
        return form.schema_


def function_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The function tools, as chat tools; a namespace's functions are offered by their own names."""
    out: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "function":
            function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
            out.append({"type": "function", "function": function})
        elif kind == "namespace":
            out += function_tools([t for t in tool.get("tools") or [] if isinstance(t, dict)])
        elif kind not in HOSTED_TOOLS:
            raise InvalidRequest(f"tools.{index}: tool type {kind!r} is not supported by mlxq", param="tools")
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest("tool_choice must be auto, none, required or a function by name", param="tool_choice")


def chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items as chat messages: function calls join the assistant turn they belong to,
    their outputs become tool messages, reasoning items are left out."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"input.{index}.role must be user, assistant, system or developer", param="input")
            # Chat templates know system, not developer: the same instruction, by its older name.
            messages.append({"role": "system" if role == "developer" else role, "content": _text(item, index)})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or item.get("id") or f"call_{index}"),
                "type": "function",
                "function": {"name": str(item.get("name") or ""), "arguments": str(item.get("arguments") or "{}")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn: its text, then its calls
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last.get("content") or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _parts_text(output or [], index)
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""), "content": content})
        elif kind == "reasoning":
            continue
        else:
            raise InvalidRequest(f"input.{index}: item type {kind!r} is not supported by mlxq", param="input")
    return messages


def _text(item: dict[str, Any], index: int) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"input.{index}.content must be a string or a list of parts", param="input")
    return _parts_text(content, index)


def _parts_text(parts: list[Any], index: int) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text", "summary_text", "refusal"):
            raise InvalidRequest(f"input.{index}: {kind!r} parts are not supported by mlxq (text only)", param="input")
        texts.append(str(part.get("text") or part.get("refusal") or ""))
    return "".join(texts)


class Shapes:
    """Builds one response's objects and events (its id, its items) from its job's result."""

    def __init__(self, job_id: str, body: ResponsesRequest) -> None:
        self.id = "resp_" + job_id.replace("-", "")
        self.message_id = "msg_" + job_id.replace("-", "")
        self.reasoning_id = "rs_" + job_id.replace("-", "")
        self.body = body
        self.created_at = int(time.time())
        self.sequence = 0

    def response(
        self, status: str, output: list[dict[str, Any]], result: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = self.body
        usage = None
        details = None
        if result is not None:
            u = result["usage"]
            cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            usage = {
                "input_tokens": u["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            }
            if result["finish_reason"] == "length":
                status, details = "incomplete", {"reason": "max_output_tokens"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": details,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning.model_dump() if body.reasoning else {"effort": None, "summary": None},
            "store": body.store,
            "temperature": body.temperature,
            "text": {"format": {"type": "text"}} if body.text is None else body.text.model_dump(by_alias=True),
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_p": body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def failed(self, error: dict[str, Any]) -> dict[str, Any]:
        return {**self.response("failed", []), "error": response_error(error)}

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": [part]}

    def reasoning(self, text: str) -> dict[str, Any]:
        """The model's reasoning as a reasoning item (its text as content; no summary is made)."""
        content = [{"type": "reasoning_text", "text": text}]
        return {
            "type": "reasoning",
            "id": self.reasoning_id,
            "summary": [],
            "content": content,
            "encrypted_content": None,
        }

    def empty_item(self, key: str) -> dict[str, Any]:
        return self.message("", "in_progress") if key == "message" else self.reasoning("")

    @staticmethod
    def call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": "fc_" + call_id.removeprefix("call_"),
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": "completed",
        }

    def output(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """Reasoning, then the message, then the calls (the order a stream opens them in)."""
        calls = [
            self.call_item(c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in result.get("tool_calls") or []
        ]
        reasoning = [self.reasoning(result["reasoning"])] if result.get("reasoning") else []
        text = [self.message(result["text"])] if result["text"] or not calls else []
        return reasoning + text + calls

    def event(self, kind: str, **data: Any) -> str:
        """One server-sent event of the stream, numbered."""
        document = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json_text(document)}\n\n"


def response_error(error: dict[str, Any]) -> dict[str, Any]:
    """A job's recorded error as a response's `error`: `{code, message}`."""
    return {"code": str(error.get("code") or "server_error"), "message": str(error.get("message"))}
