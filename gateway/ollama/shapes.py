"""Ollama's request and response shapes, translated to and from mlxq's own.

Editors and tools that only speak Ollama's API (`/api/chat`, `/api/generate`,
`/api/tags`, ...) use the same queue, admission and batching as everything
else. `options` map onto mlxq's sampling fields; hints about hardware that
mlxq manages itself (`num_ctx`, `num_gpu`, `num_thread`, ...) are accepted and
not acted on; any other option is refused with its name, never ignored.
`format` (`"json"` or a JSON schema) is enforced by constrained decoding.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.errors import InvalidRequest, MlxqError, overflow
from shared.schemas import ChatMessage, GenerateRequest, Tool, ToolChoice, json_or_text

logger = logging.getLogger(__name__)

VERSION = "0.13.5"
"""The Ollama API version these routes answer as: one with the Responses API beside /api/*, which is what
clients that check it (Codex CLI's --oss) ask for."""

OPTIONS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
"""Ollama's option -> mlxq's sampling field."""

HARDWARE = frozenset(
    {"num_ctx", "num_gpu", "num_thread", "num_batch", "num_keep", "main_gpu", "use_mmap", "use_mlock", "numa",
     "low_vram", "vocab_only", "repeat_last_n"}
)  # fmt: skip
"""Options about how Ollama would run the model: mlxq sizes and schedules that itself."""


class OllamaFunctionCall(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `images` are refused below, `thinking` is the model's own

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None

    def to_chat(self, index: int) -> ChatMessage:
        if self.images:
            raise InvalidRequest(
                "mlxq serves text models only: images are not supported", param=f"messages.{index}.images"
            )
        calls = [
            {
                "id": f"call_{index}_{n}",
                "type": "function",
                "function": {"name": c.function.name, "arguments": _json(c.function.arguments)},
            }
            for n, c in enumerate(self.tool_calls or [])
        ]
        extra: dict[str, Any] = {"tool_calls": calls} if calls else {}
        if self.role == "tool":
            extra["tool_call_id"] = f"call_{index}"
        return ChatMessage.model_validate({"role": self.role, "content": self.content, **extra})


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class _Common(BaseModel):
    # Ollama ignores top-level fields it does not know, and clients written against it send some (Cline
    # sends `tool_choice`): so does mlxq, naming them in a debug line. Fields it knows and would answer
    # differently for are read or refused by name; unknown `options` are refused (_known_options).
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _note_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(name) for name in data if name not in cls.model_fields)
            if unknown:
                logger.debug("ignoring fields Ollama's API does not have: %s", ", ".join(unknown))
        return data

    model: Annotated[str, Field(min_length=1, max_length=256)]
    stream: bool = True
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    think: bool | None = None

    @model_validator(mode="after")
    def _known_options(self) -> _Common:
        for name in self.options or {}:
            if name not in OPTIONS and name not in HARDWARE:
                raise ValueError(f"option `{name}` is not supported by mlxq; it is refused rather than ignored")
        return self

    def keep_alive_s(self) -> float | None:
        """Ollama's keep_alive in seconds: a number of seconds or a duration ("5m", "1h30m"); 0 unloads
        once idle, a negative one keeps the model for ever."""
        return None if self.keep_alive is None else duration_s(self.keep_alive, "keep_alive")

    def _generate(self, **prompt: Any) -> GenerateRequest:
        fields: dict[str, Any] = {OPTIONS[k]: v for k, v in (self.options or {}).items() if k in OPTIONS}
        if isinstance(fields.get("stop"), list) and not fields["stop"]:
            fields.pop("stop")
        if fields.get("max_tokens") in (-1, -2):
            fields.pop("max_tokens")  # Ollama's "no limit" and "fill the context": up to the limit here
        schema: dict[str, Any] | None = None
        if self.format == "json":
            schema = {"type": "object"}
        elif isinstance(self.format, dict):
            schema = self.format
        if self.think is not None:
            fields["chat_template_kwargs"] = {"enable_thinking": self.think}
        if self.keep_alive is not None:
            fields["keep_alive"] = self.keep_alive_s()
        return GenerateRequest.model_validate({"model": self.model, "json_schema": schema, **fields, **prompt})


class ChatRequest(_Common):
    messages: Annotated[list[OllamaMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    """Not Ollama's (it always lets the model choose, as `auto` does), but sent by clients written for
    both: a choice that forces or forbids a call is honoured as on the OpenAI route."""

    def to_generate(self) -> GenerateRequest:
        messages = [m.to_chat(i).model_dump(exclude_none=True) for i, m in enumerate(self.messages)]
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        choice = self.tool_choice if tools else None  # without tools Ollama has nothing to choose from
        return self._generate(messages=messages, tools=tools, tool_choice=choice)


class GenerateBody(_Common):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None
    context: list[int] | None = None

    @model_validator(mode="after")
    def _supported(self) -> GenerateBody:
        for name in ("suffix", "images", "template", "context"):
            if getattr(self, name):
                raise ValueError(f"`{name}` is not supported by mlxq; it is refused rather than ignored")
        return self

    def to_generate(self) -> GenerateRequest:
        if self.raw:
            return self._generate(prompt=self.prompt)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": self.prompt}
        ]
        return self._generate(messages=messages)


class ShowRequest(BaseModel):
    model: Annotated[str, Field(min_length=1)] | None = None
    name: Annotated[str, Field(min_length=1)] | None = None


class PullRequest(BaseModel):
    """`/api/pull`: a hub repo (`owner/name`, or `hf.co/owner/name` as Ollama writes it)."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    insecure: bool = False
    stream: bool = True

    def repo(self) -> str:
        given = self.model or self.name
        if not given:
            raise InvalidRequest("`model` names the repo to pull (owner/name)", param="model")
        for prefix in ("https://", "hf.co/", "huggingface.co/"):
            given = given.removeprefix(prefix)
        return given.removesuffix(":latest")


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1)] | None = None
    name: Annotated[str, Field(min_length=1)] | None = None


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, Field(min_length=1)]
    destination: Annotated[str, Field(min_length=1, max_length=128)]


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)")


def duration_s(value: str | int | float, field: str) -> float:
    """A number of seconds, or a Go duration as Ollama takes it ("5m", "1h30m", "-1s", "300ms")."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise InvalidRequest(f"`{field}` must be seconds or a duration such as 5m or 1h30m (got {text!r})", param=field)
    return sum(float(number) * units[unit] for number, unit in parts)


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def done_fields(result: dict[str, Any], reason: str) -> dict[str, Any]:
    """The statistics of a finished answer, in Ollama's nanoseconds."""
    timings, usage = result["timings"], result["usage"]
    load_s, generate_s = float(timings["load_s"]), float(timings["generate_s"])
    # As Ollama counts them: the prompt's evaluation up to the first token, then the decoding alone
    # (first_token_s counts from the job's start, the model's load included).
    first = timings.get("first_token_s")
    prompt_s = min(generate_s, max(0.0, float(first) - load_s)) if first is not None else 0.0
    return {
        "done": True,
        "done_reason": reason,
        "total_duration": int((float(timings["queued_s"]) + load_s + generate_s) * 1e9),
        "load_duration": int(load_s * 1e9),
        # What was evaluated, as Ollama counts it: a prompt read from a kept cache was not.
        "prompt_eval_count": usage["prompt_tokens"]
        - int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        "prompt_eval_duration": int(prompt_s * 1e9),
        "eval_count": usage["completion_tokens"],
        "eval_duration": int((generate_s - prompt_s) * 1e9),
    }


def tool_calls(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Ollama's tool calls: arguments as objects, not JSON strings."""
    calls = result.get("tool_calls") or []
    return [
        {"function": {"name": c["function"]["name"], "arguments": json_or_text(c["function"]["arguments"] or "{}")}}
        for c in calls
    ]


OPTION_OF = {field: f"options.{option}" for option, field in OPTIONS.items()}
"""mlxq's sampling field -> the Ollama option it came from, to name in errors."""


def error_body(error: MlxqError) -> dict[str, Any]:
    """Ollama's error shape: `{"error": "<message>"}`, naming an option as the client sent it."""
    message = error.message
    too_long = overflow(error)
    if too_long is not None:
        message = (
            f"the input length exceeds the context length: the prompt takes {too_long.prompt_tokens} tokens, "
            f"the model's context {too_long.context}"
        )
    if error.param in OPTION_OF:
        named = OPTION_OF[error.param]
        message = message.replace(f"{error.param}:", f"{named}:", 1).replace(f"`{error.param}`", f"`{named}`")
        if named not in message:
            message = f"{named}: {message}"
    return {"error": message}
