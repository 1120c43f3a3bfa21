"""Anthropic's Messages API shapes, translated to and from mlxq's own.

Claude Code and the official `anthropic` SDK send `POST /v1/messages`: a `system`
prompt, `messages` of text, `tool_use` and `tool_result` blocks (and system
messages among them, in order), `max_tokens` (a ceiling here, as everywhere),
`stop_sequences`, sampling fields, `tools`, and `output_config.format` (a JSON
schema, enforced). Fields that have no meaning for a local model are accepted
where ignoring them cannot change the answer: `metadata`, `thinking` (a model
thinks or not by its own chat template), `output_config.effort`, and
`context_management`'s thinking edits (past thinking is rendered as the model's
template renders it). Anything else unknown is refused by name (400). Claude Code's
attribution line (`x-anthropic-billing-header: …`, first in `system`) is left out of
the prompt (`_without_attribution`), and `usage` says what was read from kept caches.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InvalidRequest, MlxqError, overflow
from shared.schemas import GenerateRequest, json_or_text


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control and citations change nothing here

    type: Literal["text", "tool_use", "tool_result", "image", "document", "thinking"]
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Thinking(BaseModel):
    model_config = ConfigDict(extra="allow")  # display and the like: how thinking is shown

    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class ContextEdit(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Annotated[str, Field(pattern=r"^clear_thinking_\d+$")]


class ContextManagement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edits: list[ContextEdit] = Field(default_factory=list)


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[Block] | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    context_management: ContextManagement | None = None

    def to_generate(self) -> GenerateRequest:
        messages: list[dict[str, Any]] = []
        system = _without_attribution(self.system)
        if system:
            messages.append({"role": "system", "content": _text(system, "system")})
        for index, message in enumerate(self.messages):
            messages.extend(_openai_messages(message, index))
        tools: list[dict[str, Any]] = []
        for tool in self.tools or []:
            function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
            if tool.description:
                function["description"] = tool.description
            tools.append({"type": "function", "function": function})
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stop": self.stop_sequences or None,
        }
        if "temperature" in self.model_fields_set:  # else the model's default (shared/models.py)
            fields["temperature"] = self.temperature
        if self.top_p is not None:
            fields["top_p"] = self.top_p
        if self.top_k:
            fields["top_k"] = self.top_k
        if tools:
            fields["tools"] = tools
            fields["tool_choice"] = _tool_choice(self.tool_choice)
        if self.output_config is not None and self.output_config.format is not None:
            fields["json_schema"] = self.output_config.format.schema_
        if self.thinking is not None and self.thinking.type != "adaptive":
            # Where the model's template has the switch (Qwen3's enable_thinking); elsewhere it thinks as it does.
            fields["chat_template_kwargs"] = {"enable_thinking": self.thinking.type == "enabled"}
        if self.thinking is not None and self.thinking.type == "enabled" and self.thinking.budget_tokens:
            fields["reasoning_budget"] = self.thinking.budget_tokens
        return GenerateRequest.model_validate(fields)


class CountTokensRequest(MessagesRequest):
    """`POST /v1/messages/count_tokens`: a Messages request without `max_tokens`."""

    max_tokens: Annotated[int, Field(ge=1)] = 1


def _tool_choice(choice: AnthropicToolChoice | None) -> Any:
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "none":
        return "none"
    if choice.type == "any":
        return "required"
    return {"type": "function", "function": {"name": choice.name or ""}}


ATTRIBUTION = "x-anthropic-billing-header:"
"""How Claude Code's attribution line begins (`x-anthropic-billing-header: cc_version=…; cc_entrypoint=…;
cch=…;`, its own text block first in `system`)."""


def _without_attribution(system: str | list[Block] | None) -> str | list[Block] | None:
    """The system prompt without Claude Code's attribution line: billing metadata for Anthropic's API,
    meaningless to a local model, and different from one version, session or sub-agent to the next, so
    that left first in the prompt no two sessions would share a kept prefix (llama.cpp and Ollama leave
    it out too)."""
    if isinstance(system, str):
        first, _, rest = system.partition("\n")
        return rest if first.startswith(ATTRIBUTION) else system
    if system is None:
        return None
    return [
        block
        for block in system
        if not (block.type == "text" and (block.text or "").startswith(ATTRIBUTION) and "\n" not in (block.text or ""))
    ]


def _text(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.type != "text":
            raise InvalidRequest(f"{block.type!r} blocks are not supported here by mlxq (text only)", param=where)
        parts.append(block.text or "")
    return "".join(parts)


def _openai_messages(message: Message, index: int) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI-style messages: tool results become `tool` messages, an
    assistant's tool_use blocks its `tool_calls`."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "system":
        return [{"role": "system", "content": _text(message.content, f"messages.{index}.content")}]
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in message.content:
        if block.type == "text":
            text.append(block.text or "")
        elif block.type == "tool_use" and message.role == "assistant":
            arguments = json.dumps(block.input or {})
            calls.append(
                {
                    "id": block.id or "",
                    "type": "function",
                    "function": {"name": block.name or "", "arguments": arguments},
                }
            )
        elif block.type == "tool_result" and message.role == "user":
            content = block.content if isinstance(block.content, str) else _result_text(block.content or [])
            results.append({"role": "tool", "tool_call_id": block.tool_use_id or "", "content": content})
        elif block.type == "thinking" and message.role == "assistant":
            continue  # past thinking: chat templates leave it out of the prompt
        else:
            raise InvalidRequest(
                f"{block.type!r} blocks are not supported here by mlxq", param=f"messages.{index}.content"
            )
    out: list[dict[str, Any]] = list(results)
    if calls:
        out.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls})
    elif text or not results:
        out.append({"role": message.role, "content": "".join(text)})
    return out


def _result_text(blocks: list[dict[str, Any]]) -> str:
    return "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def content_blocks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The result's thinking, text and tool_use blocks, in the order a stream shows them."""
    blocks: list[dict[str, Any]] = []
    if result.get("reasoning"):
        blocks.append({"type": "thinking", "thinking": result["reasoning"], "signature": ""})
    if result["text"]:
        blocks.append({"type": "text", "text": result["text"]})
    for call in result.get("tool_calls") or []:
        arguments = call["function"]["arguments"] or "{}"
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call["id"]),
                "name": call["function"]["name"],
                # A call cut short by max_tokens has arguments that do not parse: the input as far as it is known.
                "input": json_or_text(arguments) if isinstance(json_or_text(arguments), dict) else {},
            }
        )
    return blocks


def stop_sequence(result: dict[str, Any]) -> str | None:
    """The stop sequence that ended the text, when that is the stop reason."""
    return result.get("stop_sequence") if stop_reason(result) == "stop_sequence" else None


def stop_reason(result: dict[str, Any]) -> str:
    """Anthropic's stop_reason; `stop_sequence` when one of the request's stop sequences ended the text."""
    if result["finish_reason"] == "stop" and result.get("stop_sequence"):
        return "stop_sequence"
    return STOP_REASONS.get(result["finish_reason"], "end_turn")


def message(job_id: str, model: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_" + job_id.replace("-", ""),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(result),
        "stop_reason": stop_reason(result),
        "stop_sequence": stop_sequence(result),
        "usage": usage(result),
    }


def usage(result: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage: the prompt's tokens read from kept caches apart (`cache_read_input_tokens`,
    which Claude Code shows as cache reads) from those computed (`input_tokens`). mlxq keeps what it
    computes without being asked, so nothing counts as written to a cache on request."""
    counted = result["usage"]
    cached = int((counted.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": counted["prompt_tokens"] - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": counted["completion_tokens"],
    }


def error_status(error: MlxqError) -> int:
    """Anthropic answers an invalid request with 400, where mlxq's own routes say 422."""
    return 400 if error.status_code == 422 else error.status_code


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
"""Anthropic's error types by HTTP status; anything else is an `api_error`."""


def error_body(error: MlxqError) -> dict[str, Any]:
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`."""
    kind = ERROR_TYPES.get(error.status_code, "api_error")
    too_long = overflow(error)
    if too_long is not None:  # Anthropic's sentence, which Claude Code reacts to
        message = f"prompt is too long: {too_long.prompt_tokens} tokens > {too_long.context} maximum"
        return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return {"type": "error", "error": {"type": kind, "message": error.message}}
