"""The OpenAPI schema with this gateway's own limits written in, so that it tells the truth.

Pydantic models describe shapes; some limits come from the models file, known
only when the gateway starts: which models exist. Written into the schema,
clients (and fuzzers) see what would be refused instead of finding out from a
404. (`max_tokens` has no maximum: a larger one is a ceiling, gateway/admission/prompt_limits.py.)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi


def install(app: FastAPI, model_names: list[str]) -> None:
    """Make `app.openapi()` answer the schema with the limits written in (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes, description=None
            )
            for component in schema.get("components", {}).get("schemas", {}).values():
                properties = component.get("properties", {})
                if "model" in properties:
                    _constrain(properties["model"], "string", {"enum": sorted(model_names)})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _constrain(prop: dict[str, Any], kind: str, extra: dict[str, Any]) -> None:
    """Add `extra` to the `kind` member of `prop` (the property itself, or its member in an anyOf)."""
    for member in [prop, *prop.get("anyOf", [])]:
        if member.get("type") == kind:
            member.update(extra)
