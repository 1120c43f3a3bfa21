"""Which shape an error body takes: each protocol's routes carry their own.

A protocol module builds its router with `router_for(its_error_body)`; the
routes it declares then carry that shape, and the app's error handlers
(gateway/errors.py) ask the matched route for it. OpenAI's shape is the default,
for mlxq's own routes too. A path no route matches takes the shape of the
protocol that claims its prefix in the app (`app.state.error_prefixes`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from gateway.http.strict_json import StrictJsonRequest
from shared.errors import MlxqError

ErrorBody = Callable[[MlxqError], dict[str, Any]]
ErrorStatus = Callable[[MlxqError], int]


def openai_error(error: MlxqError) -> dict[str, Any]:
    """`{"error": {"message", "type", "code", "param"}}`."""
    return error.to_body()


def own_status(error: MlxqError) -> int:
    return error.status_code


class ShapedRoute(APIRoute):
    """A route whose errors take its protocol's shape (and status, where the protocol differs), and
    whose body is read strictly (gateway/http/strict_json.py)."""

    error_body: ClassVar[ErrorBody] = staticmethod(openai_error)
    error_status: ClassVar[ErrorStatus] = staticmethod(own_status)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict


def router_for(error_body: ErrorBody, error_status: ErrorStatus = own_status, **kwargs: Any) -> APIRouter:
    """An APIRouter whose routes answer errors in `error_body`'s shape, with `error_status`."""
    shape = {"error_body": staticmethod(error_body), "error_status": staticmethod(error_status)}
    route_class = type(f"{error_body.__module__}.Route", (ShapedRoute,), shape)
    return APIRouter(route_class=route_class, **kwargs)


def shape_for(request: Request | None, error: MlxqError) -> tuple[int, dict[str, Any]]:
    """The error's status and body in the shape of the route `request` reached (OpenAI's by default)."""
    if request is None:
        return error.status_code, openai_error(error)
    route = request.scope.get("route")
    if isinstance(route, ShapedRoute):
        return type(route).error_status(error), type(route).error_body(error)
    prefixes: dict[str, ErrorBody] = getattr(request.app.state, "error_prefixes", {})
    for prefix, shape in prefixes.items():
        if request.url.path.startswith(prefix):
            return error.status_code, shape(error)
    return error.status_code, openai_error(error)
