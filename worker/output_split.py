"""A row's output split as it is generated: reasoning, answer text and tool calls, never their markers.

The row hands over text as soon as no stop string can still claim it; this splits
it further. Only characters that could still be the start of a marker
(`<think>`, `</think>`, `<tool_call>`, ...) are held back, and only until they are
decided, so a client sees the answer token by token whether or not tools are
offered. A call in the JSON form `{"name": ..., "arguments": {...}}` (between
markers, or the whole text of a forced call) is streamed as it forms: its name
first, then its arguments as they grow. A model family with a parser of its own
(mlx-lm's) has each call reported whole when its end marker arrives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import uuid4

from shared.schemas import TOOL_NAME_MAX

PieceKind = Literal["text", "reasoning", "call", "arguments"]

_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
"""The head of a JSON call, up to where its arguments begin."""

_TAIL = "} \t\r\n"
"""What may still turn out to be the end of the call's wrapper object rather than its arguments."""


@dataclass(frozen=True)
class Piece:
    """Something new to show: text or reasoning, a call's start (`call`: id and name), or more of
    a call's arguments (`arguments`)."""

    kind: PieceKind
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


@dataclass(frozen=True)
class Markers:
    """How a model marks its reasoning and its calls (from its tokenizer; models.toml may say)."""

    think: tuple[str, str] | None = None
    call: tuple[str, str] | None = None
    parser: Callable[[str, list[dict[str, Any]]], Any] | None = None
    """A model family's own call parser (mlx-lm's); None: JSON between the markers."""
    dropped: tuple[str, ...] = ()
    """Structure that is neither reasoning nor text nor a call (a message header of gpt-oss's): taken
    out of the text wherever it stands."""


@dataclass
class _Call:
    id: str
    body: str = ""
    name: str | None = None
    args_at: int = 0
    """Where the arguments begin in `body`, once the name is known."""
    sent: int = 0
    """How much of the arguments was handed out."""
    announced: bool = False
    """Its `call` piece (id and name) is out."""


@dataclass
class OutputSplit:
    """Splits one row's output; `reasoning`, `content` and `calls` hold what it has found so far."""

    markers: Markers
    thinking: bool = False
    """In reasoning now: a template that opens the reasoning in the prompt starts here."""
    forced: bool = False
    """The whole output is one call (generated under its JSON schema)."""
    forced_name: str = ""
    """The function a forced call names (tool_choice), when one is named."""
    max_calls: int = 1 << 30
    """1 with parallel_tool_calls false: later calls are neither streamed nor kept."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    _pending: str = ""
    _call: _Call | None = None
    _known_ids: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.forced:
            self._call = _Call(_call_id())

    def keep_ids(self, ids: dict[int, str]) -> None:
        """The ids an earlier attempt gave its calls, by index: the same calls made again (a job
        carried on after a crash) keep them, as the stream already showed them."""
        self._known_ids = dict(ids)
        if self._call is not None and not self._call.announced:
            self._call.id = self._id_for(len(self.calls))

    def _id_for(self, index: int) -> str:
        return self._known_ids.get(index) or _call_id()

    def feed(self, text: str) -> list[Piece]:
        """The pieces `text` (the output's next characters) completes."""
        self._pending += text
        pieces: list[Piece] = []
        while self._pending:
            before = self._pending
            if self._call is not None:
                self._in_call(pieces)
            elif self.thinking:
                self._until(self._end_of_thinking(), "reasoning", pieces)
            else:
                self._in_text(pieces)
            if self._pending == before:
                break  # the rest may still be a marker: wait for more
        return pieces

    def finish(self, cut: bool = False) -> list[Piece]:
        """Everything held back, at the end of the output; `cut` when max_tokens ended it (an unfinished
        call is still reported, with its arguments as far as they got)."""
        pieces: list[Piece] = []
        rest, self._pending = self._pending, ""
        if self._call is not None:
            self._call.body += rest
            # The output ended inside the call (its length, end of text, a stop string): what was
            # written of it is what it is; a forced call is as far as it got in any case.
            self._end_call(pieces, cut=cut or self.forced, closed=False)
        elif rest:
            kind: PieceKind = "reasoning" if self.thinking else "text"
            self._add(kind, rest, pieces)
        return pieces

    # -- states ---------------------------------------------------------------------------

    def _in_text(self, pieces: list[Piece]) -> None:
        starts = [m for m in (self._think_start(), self._call_start(), *self.markers.dropped) if m]
        found = [(self._pending.find(m), m) for m in starts if m in self._pending]
        if found:
            at, marker = min(found, key=lambda hit: (hit[0], -len(hit[1])))
            self._add("text", self._pending[:at], pieces)
            self._pending = self._pending[at + len(marker) :]
            if marker == self._think_start():
                self.thinking = True
            elif marker == self._call_start():
                self._call = _Call(self._id_for(len(self.calls)))
            return
        safe = len(self._pending) - _held(self._pending, starts)
        self._add("text", self._pending[:safe], pieces)
        self._pending = self._pending[safe:]

    def _until(self, marker: str | None, kind: PieceKind, pieces: list[Piece]) -> None:
        if marker and marker in self._pending:
            at = self._pending.find(marker)
            self._add(kind, self._pending[:at], pieces)
            self._pending = self._pending[at + len(marker) :]
            self.thinking = False
            return
        safe = len(self._pending) - (_held(self._pending, [marker]) if marker else 0)
        self._add(kind, self._pending[:safe], pieces)
        self._pending = self._pending[safe:]

    def _in_call(self, pieces: list[Piece]) -> None:
        call = self._call
        assert call is not None
        end = None if self.forced else self._call_end()
        if end and end in self._pending:
            at = self._pending.find(end)
            call.body += self._pending[:at]
            self._pending = self._pending[at + len(end) :]
            self._end_call(pieces, cut=False, closed=True)
            return
        safe = len(self._pending) - (_held(self._pending, [end]) if end else 0)
        call.body += self._pending[:safe]
        self._pending = self._pending[safe:]
        if self.markers.parser is None or self.forced:
            self._stream_arguments(call, pieces)

    def _stream_arguments(self, call: _Call, pieces: list[Piece]) -> None:
        if len(self.calls) >= self.max_calls:
            return
        if call.name is None:
            head = _NAME.match(call.body)
            if head is None or not _usable_name(name := json.loads(f'"{head.group(1)}"')):
                return
            call.name, call.args_at, call.announced = name, head.end(), True
            pieces.append(Piece("call", index=len(self.calls), id=call.id, name=call.name))
        grown = call.body[call.args_at :].lstrip().rstrip(_TAIL)
        if len(grown) > call.sent:
            pieces.append(Piece("arguments", grown[call.sent :], index=len(self.calls)))
            call.sent = len(grown)

    def _end_call(self, pieces: list[Piece], cut: bool, closed: bool) -> None:
        call = self._call
        assert call is not None
        self._call = None
        parsed = self._parsed(call, cut)
        if parsed is None and (self.forced or call.announced):
            # Already shown as a call (or forced to be one): it stays one, with its arguments as
            # written, even where they do not parse (OpenAI's arguments need not either).
            name = call.name or self.forced_name or self._completed_name(_partial_name(call.body))
            if not name:
                return  # a forced call cut before it named anything: there is no call to show
            parsed = [(name, self._raw_arguments(call))]
        if parsed is None:
            # Not a call after all (or not one we can read): it stays text, markers included.
            start, end = self.markers.call or ("", "")
            self._add("text", f"{start}{call.body}{end if closed else ''}", pieces)
            return
        for n, (name, arguments) in enumerate(parsed):
            if len(self.calls) >= self.max_calls:
                return  # parallel_tool_calls false: the first call only, streamed and not
            index = len(self.calls)
            call_id = call.id if n == 0 else self._id_for(index)
            if n == 0 and call.announced:
                if len(arguments) > call.sent:
                    pieces.append(Piece("arguments", arguments[call.sent :], index=index))
            else:
                pieces.append(Piece("call", index=index, id=call_id, name=name))
                pieces.append(Piece("arguments", arguments, index=index))
            self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})

    def _completed_name(self, start: str) -> str:
        """The offered function a call cut inside its name was naming: constrained decoding writes
        only offered names, so a start that one name alone begins is that name (with one tool
        offered, even an empty start). "" when the start could be more than one: such a call names
        nothing, and is dropped."""
        names = [t["function"]["name"] for t in self.tools if t.get("type") == "function"]
        matching = [name for name in names if name.startswith(start)]
        return matching[0] if len(matching) == 1 else ""

    @staticmethod
    def _raw_arguments(call: _Call) -> str:
        """The arguments as the model wrote them: everything after their key, less the wrapper's brace."""
        if call.name is None:
            return ""
        body = call.body[call.args_at :].strip(" \t\r\n")
        return body[:-1].rstrip(" \t\r\n") if body.endswith("}") and not _parses(body) else body

    def _parsed(self, call: _Call, cut: bool) -> list[tuple[str, str]] | None:
        """(name, arguments) of each call in the body; None when it is not a call. JSON arguments are
        the model's own text (what was streamed of them is its start), checked to parse."""
        if self.markers.parser is not None and not self.forced:
            try:
                found = self.markers.parser(call.body, self.tools)
            except Exception:
                return None
            out = [
                (one["name"], _arguments(one.get("arguments", {})))
                for one in (found if isinstance(found, list) else [found])
                if isinstance(one, dict) and _usable_name(one.get("name"))
            ]
            return out or None
        head = _NAME.match(call.body)
        if head is None:
            return None
        name, body = json.loads(f'"{head.group(1)}"'), call.body[head.end() :].strip(" \t\r\n")
        if not _usable_name(name):
            return None
        inner = body[:-1].rstrip(" \t\r\n") if body.endswith("}") else None  # less the wrapper's own brace
        if inner is not None and _parses(inner):
            return [(name, inner)]
        if cut:
            return [(name, body if _parses(body) else body.rstrip(_TAIL))]  # as far as they got, as OpenAI does
        return None

    # -- helpers ----------------------------------------------------------------------------

    def _add(self, kind: PieceKind, text: str, pieces: list[Piece]) -> None:
        if not text:
            return
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        if pieces and pieces[-1].kind == kind:
            pieces[-1] = Piece(kind, pieces[-1].text + text)
        else:
            pieces.append(Piece(kind, text))

    def _think_start(self) -> str | None:
        return self.markers.think[0] if self.markers.think else None

    def _end_of_thinking(self) -> str | None:
        return self.markers.think[1] if self.markers.think else None

    def _call_start(self) -> str | None:
        return self.markers.call[0] if self.markers.call and self.tools else None

    def _call_end(self) -> str | None:
        return self.markers.call[1] if self.markers.call else None


def _held(text: str, markers: Sequence[str | None]) -> int:
    """How many trailing characters of `text` could still begin one of `markers`."""
    held = 0
    for marker in markers:
        if not marker:
            continue
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                held = max(held, size)
                break
    return held


def _usable_name(name: object) -> bool:
    """A name a call can carry (shared/schemas.py FunctionCall): what a model wrote may be neither."""
    return isinstance(name, str) and 0 < len(name) <= TOOL_NAME_MAX


def _partial_name(body: str) -> str:
    found = re.match(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)', body)
    return found.group(1) if found else ""


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _call_id() -> str:
    return f"call_{uuid4().hex[:24]}"
