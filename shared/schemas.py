"""Request and result shapes shared by the gateway (validation) and worker (execution)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Seed = Annotated[int, Field(ge=0, le=2**64 - 1, description="for reproducible sampling")]
"""MLX seeds its generator with an unsigned 64-bit integer."""

JobStatus = Literal["queued", "started", "finished", "failed", "canceled"]
FinishReason = Literal["stop", "length", "canceled", "timeout", "tool_calls"]


class TextPart(BaseModel):
    """One text part of a multi-part message, as OpenAI's API allows."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


TOOL_NAME_MAX = 64
"""The longest function name a tool or a call may carry (OpenAI's limit)."""


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=TOOL_NAME_MAX)]
    arguments: str = Field(description="the arguments as a JSON string, as OpenAI sends them")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: Annotated[str, Field(min_length=1, max_length=128)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="an assistant message's tool calls")
    tool_call_id: str | None = Field(default=None, description="a tool message: the call it answers")

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("`content` is required (only an assistant message with `tool_calls` may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("`tool_calls` belong to assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs `tool_call_id`: the id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (tool call arguments as objects where they parse)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json_or_text(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        return message


def json_or_text(text: str) -> Any:
    """`text` parsed as JSON, or `text` itself when it is not JSON (tool call arguments as sent)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=TOOL_NAME_MAX, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class Name(BaseModel):
        name: str

    type: Literal["function"]
    function: Name


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


def call_schema(tool: Tool) -> dict[str, Any]:
    """What a forced call to `tool` must look like: `{"name": ..., "arguments": {...}}`."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar that constrains generation to JSON matching `schema`. Whitespace is
    kept compact, so that a model cannot pad its way to `max_tokens`."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def json_schema_problem(schema: dict[str, Any]) -> str:
    """Why `schema` cannot be enforced (an unsupported feature, named), or "" when it can."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.validate_grammar(json_schema_grammar(schema))
    except ValueError as exc:
        return str(exc)


class GenerateRequest(BaseModel):
    """A generation: chat `messages` or a raw `prompt`, and sampling options."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        # What `_one_input` checks, so that the schema says it too.
        json_schema_extra={"oneOf": [{"required": ["messages"]}, {"required": ["prompt"]}]},
    )

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    prompt: Annotated[str, Field(min_length=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    seed: Seed | None = None
    top_k: Annotated[int, Field(ge=0, le=1_000_000, description="sample from the k likeliest tokens only (0: off)")] = 0
    min_p: Annotated[
        float, Field(ge=0.0, le=1.0, description="drop tokens less likely than min_p x the likeliest (0: off)")
    ] = 0.0
    repetition_penalty: Annotated[
        float, Field(ge=0.1, le=10.0, description="divide the logits of the last 20 tokens by this (1: off)")
    ] = 1.0
    presence_penalty: Annotated[
        float, Field(ge=-2.0, le=2.0, description="subtract from the logit of every token generated so far")
    ] = 0.0
    frequency_penalty: Annotated[
        float, Field(ge=-2.0, le=2.0, description="subtract this x its count so far from each token's logit")
    ] = 0.0
    logit_bias: (
        Annotated[
            dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]],
            Field(max_length=300, description="token id -> bias added to its logit (-100 bans it, 100 forces it)"),
        ]
        | None
    ) = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: ToolChoice | None = Field(
        default=None, description="auto (default with tools), none, required, or a named function (forced)"
    )
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description='constrain the output to JSON matching this JSON schema ({} or {"type": "object"}: any'
        " JSON object); unsupported schema features are a 422",
    )
    logprobs: bool = Field(default=False, description="return each generated token's log probability")
    top_logprobs: Annotated[
        int, Field(ge=0, le=20, description="with `logprobs`, also the likeliest alternatives at each token")
    ] = 0
    ignore_eos: bool = Field(default=False, description="keep generating past end-of-sequence (benchmarks)")
    keep_alive: Annotated[float, Field(ge=-1.0e9, le=1.0e9, allow_inf_nan=False)] | None = Field(
        default=None,
        description="seconds the model stays loaded once idle after this request (0: unloaded once idle;"
        " negative: for ever); default: the model's keep_alive_s",
    )
    reasoning_budget: (
        Annotated[int, Field(ge=1, description="most tokens the reasoning may take; then the model is made to end it")]
        | None
    ) = None
    chat_template_kwargs: (
        Annotated[
            dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], bool | int | str],
            Field(max_length=16, description='passed to the chat template, e.g. {"enable_thinking": false}'),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` or `prompt`")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        self._check_tools()
        if self.json_schema is not None:
            if self.ignore_eos:
                raise ValueError("`ignore_eos` cannot be combined with `json_schema`: the JSON ends with end-of-text")
            problem = json_schema_problem(self.json_schema)
            if problem:
                raise ValueError(f"`json_schema` cannot be enforced: {problem}")
        return self

    def _check_tools(self) -> None:
        choice = self.tool_choice
        if choice is None or choice == "none" or (choice == "auto" and self.tools):
            return
        if not self.tools:
            raise ValueError("`tool_choice` needs `tools`")
        if self.json_schema is not None:
            raise ValueError("`tool_choice` forcing a call cannot be combined with `json_schema`")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"`tool_choice` names {choice.function.name!r}, which is not among `tools`")
        for tool in self.tools:
            problem = json_schema_problem(call_schema(tool))
            if problem:
                raise ValueError(f"`tools` function {tool.function.name!r} cannot be enforced: {problem}")

    def forced_call_schema(self) -> dict[str, Any] | None:
        """The JSON schema a forced tool call (`required` or a named function) must match, else None."""
        if not self.tools or self.tool_choice in (None, "auto", "none"):
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            [tool] = [t for t in self.tools if t.function.name == self.tool_choice.function.name]
            return call_schema(tool)
        return {"anyOf": [call_schema(tool) for tool in self.tools]}

    def offers_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def for_template(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
        """The messages, tools and template arguments as the chat template renders them (the gateway
        counts the prompt with the same rendering the worker generates from)."""
        messages = [m.for_template() for m in self.messages or []]
        return messages, self.template_tools() or None, dict(self.chat_template_kwargs or {})

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools offered to the model, as its chat template and its call parser see them."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []] if self.offers_tools() else []

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.text()) for m in self.messages or [])


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        default=0, description="prompt tokens taken from a kept prefix's KV cache instead of being computed"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class Timings(BaseModel):
    queued_s: float
    load_s: float
    generate_s: float
    first_token_s: float | None = Field(
        default=None, description="from the job's start on the worker (model load included) to its first token"
    )
    hops_ms: dict[str, float] = Field(
        default_factory=dict,
        description="milliseconds from the job's enqueueing to each hop: `received` (the request's arrival at its "
        "gateway) and `accepted` (the start of its admission), both before the enqueueing (negative), then on "
        "its worker `claimed`, `submitted` (to the engine), `first_token` (made), "
        "`first_written` (its first output in the job's stream), `generated` (its whole output, as the job's "
        "thread has it)",
    )


class GenerationResult(BaseModel):
    """What a finished generation job returns (stored by RQ as JSON)."""

    text: str
    reasoning: str | None = Field(default=None, description="the model's reasoning, apart from `text` (its answer)")
    stop_sequence: str | None = Field(default=None, description="the stop string that ended the text, if one did")
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str
    logprobs: list[dict[str, Any]] | None = Field(
        default=None,
        description="with `logprobs`: one entry per generated token (token, logprob, bytes, top_logprobs)",
    )
    tool_calls: list[ToolCall] | None = Field(default=None, description="the calls parsed from the output")


class JobView(BaseModel):
    """A job as `GET /v1/jobs/{id}` shows it."""

    id: str
    status: JobStatus
    model: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    position: int | None = Field(default=None, description="0-based place in the queue while queued")
    attempts: int = Field(default=0, description="times this job was running when its worker died")
    waiting_for: dict[str, Any] | None = Field(
        default=None, description="what a queued job waits for besides its turn: {'pull': its model's download}"
    )
    result: GenerationResult | None = None
    embedding: dict[str, Any] | None = Field(
        default=None, description="an embedding or rerank job's result: its vectors (or scores) and tokens"
    )
    error: dict[str, Any] | None = None
