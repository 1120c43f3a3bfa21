"""Logging for every entry point: text with the record's fields appended, or one JSON object a line.

Fields come from `extra=` (job_id, model, queue, ...). Prompts are never passed
as fields; RQ's job descriptions hold only the model unless
`MLXQ_DESCRIBE_PROMPTS` is set.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
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


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
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
