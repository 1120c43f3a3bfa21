"""gpt-oss's output format (OpenAI's harmony) as the markers a row's output is split by.

gpt-oss writes each message as a header and a body: `<|channel|>analysis<|message|>`
opens its reasoning, which `<|end|>` closes; `<|start|>assistant<|channel|>final<|message|>`
opens the answer, which `<|return|>` ends; a tool call is a commentary message with
a recipient, `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}`,
ended by `<|call|>`, and a commentary message without one is a preamble shown as
text. mlx-lm has no parser of its own for it, so the headers are markers here:
reasoning and calls as any family's, the rest of the headers dropped from the text.
"""

from __future__ import annotations

import re
from typing import Any

from worker.output_split import Markers

TOKENS = ("<|channel|>", "<|message|>", "<|end|>", "<|call|>")
"""Special tokens whose presence in a vocabulary says the model writes harmony."""

CALL_END = "<|call|>"

_RECIPIENT = re.compile(r"^\s*(?:functions\.)?([^\s<]+)")


def speaks_harmony(vocab: dict[str, int]) -> bool:
    return all(token in vocab for token in TOKENS)


def call(body: str, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A call from what follows `to=` up to its end: the recipient names the function, the message
    is its arguments (JSON, as `<|constrain|>json` says)."""
    recipient = _RECIPIENT.match(body)
    if recipient is None or "<|message|>" not in body:
        raise ValueError("not a harmony call")
    arguments = body.split("<|message|>", 1)[1]
    return {"name": recipient.group(1), "arguments": arguments.removesuffix(CALL_END).strip()}


MARKERS = Markers(
    think=("<|channel|>analysis<|message|>", "<|end|>"),
    call=("<|channel|>commentary to=", CALL_END),
    parser=call,
    dropped=(
        "<|start|>assistant",
        "<|channel|>final<|message|>",
        "<|channel|>commentary<|message|>",
        "<|end|>",
        "<|return|>",
    ),
)
"""How gpt-oss marks its reasoning and calls, and the headers that are not text."""
