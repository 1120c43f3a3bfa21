"""OpenAI's request and response shapes, translated to and from mlxq's own.

Nothing is silently ignored that would change the answer: a parameter mlxq does
not support (tools, response_format other than text, logprobs, `n` > 1, ...) or
does not know is refused with a 422 naming it, instead of free text that looks
like an answer. Parameters that change nothing about the text (`user`,
`metadata`, `store`, `service_tier`) are accepted. `priority` (lower only) and
`ignore_eos` are mlxq's own additions.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.models import DEFAULT_FIELDS
from shared.schemas import ChatMessage, GenerateRequest, Seed, Tool, ToolChoice

Positive = Annotated[int, Field(ge=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


HARMLESS = frozenset({"user", "metadata", "store", "service_tier"})
"""OpenAI parameters that do not change the text: accepted and not acted on."""

NOT_YET = {
    "functions": "function calls",
    "function_call": "function calls",
    "best_of": "best_of",
    "echo": "echo",
    "suffix": "suffix",
    "audio": "audio output",
    "modalities": "audio output",
    "prediction": "predicted outputs",
    "reasoning_effort": "reasoning effort",
    "web_search_options": "web search",
}
"""Parameters mlxq does not support yet, and what each asks for."""


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Positive | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1, description="choices to generate: only 1 is supported")] = 1
    user: str | None = None
    priority: Literal["interactive", "normal", "low"] | None = None
    top_k: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(ge=0.1, le=10.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _nothing_ignored(self) -> _Common:
        for name in self.model_extra or {}:
            if name in HARMLESS:
                continue
            if name in NOT_YET:
                raise ValueError(
                    f"`{name}` asks for {NOT_YET[name]}, which mlxq does not support yet; the answer would "
                    "ignore it, so the request is refused (see the README's parameter table)"
                )
            raise ValueError(f"`{name}` is not a parameter mlxq knows; it is refused rather than ignored")
        return self

    def _generate(self, **prompt: Any) -> GenerateRequest:
        # Sampling fields only as the request sets them: the rest is the model's default (shared/models.py).
        chosen = {name: getattr(self, name) for name in DEFAULT_FIELDS if name in self.model_fields_set}
        return GenerateRequest(
            model=self.model,
            stop=self.stop,
            seed=self.seed,
            logit_bias=self.logit_bias,
            ignore_eos=self.ignore_eos,
            **chosen,
            **prompt,
        )


class JsonSchemaFormat(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema`: enforced by constrained decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_json_schema(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("`response_format.json_schema` is required with type json_schema")
            return self.json_schema.schema_
        return None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Positive | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, bool | int | str] | None = None
    """vLLM's: passed to the chat template (`{"enable_thinking": false}` turns Qwen3's reasoning off)."""

    def to_generate(self) -> GenerateRequest:
        request = self._generate(
            messages=self.messages,
            chat_template_kwargs=self.chat_template_kwargs,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            json_schema=self.response_format.as_json_schema() if self.response_format else None,
        )
        if self.max_completion_tokens is not None:
            request.max_tokens = self.max_completion_tokens
        return request


class CompletionRequest(_Common):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    )

    logprobs: (
        Annotated[int, Field(ge=0, le=5, description="return each token's log probability and this many alternatives")]
        | None
    ) = None

    def to_generate(self) -> GenerateRequest:
        return self._generate(
            prompt=self.prompt if isinstance(self.prompt, str) else self.prompt[0],
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
        )


def usage(result: dict[str, Any]) -> dict[str, Any]:
    u = result["usage"]
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": u.get("prompt_tokens_details", {}).get("cached_tokens", 0)},
    }


class Shapes:
    """Builds the response objects for one call (chat or text completion) of one job."""

    def __init__(self, chat: bool, job_id: str, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self.model = model
        self.created = int(time.time())
        self.streamed_chars = 0

    def _logprobs(self, entries: list[dict[str, Any]] | None, text_offset: int = 0) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": entries} if self.chat else for_completions(entries, text_offset)

    def complete(self, result: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": result["finish_reason"],
            "logprobs": self._logprobs(result.get("logprobs")),
        }
        if self.chat:
            calls = result.get("tool_calls")
            choice["message"] = {
                "role": "assistant",
                "content": result["text"] if not calls else (result["text"] or None),
            }
            if result.get("reasoning"):
                # DeepSeek's and vLLM's field, and vLLM's newer name for it.
                choice["message"]["reasoning_content"] = choice["message"]["reasoning"] = result["reasoning"]
            if calls:
                choice["message"]["tool_calls"] = calls
        else:
            choice["text"] = result["text"]
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(result),
        }

    def chunk(
        self,
        text: str | None = None,
        finish_reason: str | None = None,
        first: bool = False,
        entries: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason,
            "logprobs": self._logprobs(entries, self.streamed_chars),
        }
        self.streamed_chars += len(text or "")
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def reasoning_chunk(self, text: str) -> dict[str, Any]:
        chunk = self.chunk()
        chunk["choices"][0]["delta"] = {"reasoning_content": text, "reasoning": text}
        return chunk

    def call_chunk(self, index: int, call_id: str, name: str) -> dict[str, Any]:
        """A tool call begins: its id and name (its arguments follow in `arguments_chunk`s)."""
        chunk = self.chunk()
        call = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        chunk["choices"][0]["delta"] = {"tool_calls": [call]}
        return chunk

    def arguments_chunk(self, index: int, text: str) -> dict[str, Any]:
        chunk = self.chunk()
        chunk["choices"][0]["delta"] = {"tool_calls": [{"index": index, "function": {"arguments": text}}]}
        return chunk

    def usage_chunk(self, result: dict[str, Any]) -> dict[str, Any]:
        return {**self.chunk(), "choices": [], "usage": usage(result)}


def for_completions(entries: list[dict[str, Any]], text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, and each token's offset in the text."""
    offsets = []
    at = text_offset
    for item in entries:
        offsets.append(at)
        at += len(item["token"])
    return {
        "tokens": [item["token"] for item in entries],
        "token_logprobs": [item["logprob"] for item in entries],
        "top_logprobs": [{alt["token"]: alt["logprob"] for alt in item["top_logprobs"]} for item in entries],
        "text_offset": offsets,
    }
