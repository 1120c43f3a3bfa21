"""Request bodies read strictly: what Python's JSON reader lets through and the rest of the gateway
cannot hold is refused here, naming where it is.

`json.loads` accepts a lone UTF-16 surrogate (`"\\ud800"`), which no UTF-8 encoder
can write again (hashing a request, counting its tokens, storing its job all
failed with 500s); NaN, Infinity and numbers past a float's range, which JSON
does not have; and nesting deep enough to exhaust recursion further on. Invalid
UTF-8 and bodies that are not a JSON object are refused with the same care. Each
refusal is an InvalidRequest naming the field (`messages.0.content`) or `body`,
so every route answers it in its protocol's shape (gateway/error_shapes.py).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException

from shared.errors import InvalidRequest

MAX_DEPTH = 64
"""Deepest nesting a body may have (a tool's JSON Schema included); far more than any real one."""


class BodyRefused(HTTPException):
    """Raised from `StrictJsonRequest.json`; FastAPI lets an HTTPException through as it is, and the
    gateway's handler answers `error`."""

    def __init__(self, error: InvalidRequest) -> None:
        super().__init__(status_code=error.status_code, detail=error.message)
        self.error = error


class _NotANumber:
    def __init__(self, literal: str) -> None:
        self.literal = literal


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = decode(await self.body())
        return self._json


def decode(raw: bytes) -> Any:
    """The body's JSON object, or BodyRefused naming what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refused("body", f"The body is not valid UTF-8 (byte {exc.start} of {len(raw)})") from None
    try:
        value = json.loads(text, parse_constant=_NotANumber, parse_float=_float)
    except RecursionError:
        raise _refused("body", f"The body nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise _refused("body", f"The body is not valid JSON: {exc.msg} ({where})") from None
    except ValueError:  # an integer past Python's 4,300 digits
        raise _refused("body", "The body has a number too long to read") from None
    _check(value)
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise _refused("body", f"The body must be a JSON object, not {kind}")
    return value


def _float(literal: str) -> float | _NotANumber:
    number = float(literal)
    return _NotANumber(literal) if math.isinf(number) else number


def _check(value: Any) -> None:
    """Walk the value (without recursion: depth is what is checked) for what cannot stay."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise _refused(_name(path[:4]) + "…", f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, _NotANumber):
            raise _refused(_name(path), f"{item.literal} is not a number JSON allows")
        if isinstance(item, str):
            _encodable(item, path)
        elif isinstance(item, dict):
            for key, member in item.items():
                _encodable(key, path)
                stack.append((member, [*path, _printable(key)]))
        elif isinstance(item, list):
            stack.extend((member, [*path, str(n)]) for n, member in enumerate(item))


def _encodable(text: str, path: list[str]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise _refused(_name(path), f"has a lone UTF-16 surrogate (\\u{code:04x}), which is not text") from None


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode()


def _name(path: list[str]) -> str:
    return ".".join(path) or "body"


def _refused(param: str, message: str) -> BodyRefused:
    return BodyRefused(InvalidRequest(message if param == "body" else f"{param}: {message}", param=param))
