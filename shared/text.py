"""Redis replies come back as bytes (RQ needs a client that does not decode)."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """A reply value as str."""
    return value.decode() if isinstance(value, bytes) else str(value)
