"""Logging for every entry point: text with the record's fields appended, or one JSON object a line.

Fields come from `extra=` (job_id, model, queue, ...). Prompts are never passed
as fields; RQ's job descriptions hold only the model unless
`MLXQ_DESCRIBE_PROMPTS` is set. A logged exception shows its frames and type but
never its message, whoever logs it (uvicorn included): library messages quote the
data they choked on, such as pydantic's `input_value` or a job's arguments.
"""

from __future__ import annotations

import json
import logging
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from shared.settings import Settings

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_OURS = ("gateway", "worker", "shared", "__main__")
_NEVER = {"args", "kwargs", "description", "prompt", "messages"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Fields from `extra=`, for our own loggers only: RQ's records carry a job's arguments (the prompt)."""
    if not record.name.startswith(_OURS):
        return {}
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _NEVER and not k.startswith("_")}


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def without_messages(exc_info: ExcInfo) -> str:
    """A traceback (chained exceptions included) with each exception's type in place of its message."""
    chain: list[BaseException] = []
    exc: BaseException | None = exc_info[1]
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    lines: list[str] = []
    for exc in reversed(chain):
        if lines:
            lines.append("\nwhich led to:\n")
        lines.append("Traceback (most recent call last):\n")
        lines.extend(traceback.format_tb(exc.__traceback__))
        lines.append(f"{type(exc).__module__}.{type(exc).__qualname__} (message not logged: it may quote input)")
    return "".join(lines)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return without_messages(ei)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return without_messages(ei)

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
