"""Every refusal and failure as a JSON error in the shape of the route's protocol (gateway/error_shapes.py)."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from gateway.error_shapes import shape_for
from gateway.http.strict_json import BodyRefused
from gateway.streams.waiting import ClientGone
from shared import keys
from shared.errors import GatewayBusy, InvalidRequest, MlxqError, ServiceUnavailable
from shared.outage import REDIS, pool_exhausted
from shared.redis_errors import RedisRefusing, condition_of

logger = logging.getLogger(__name__)

REDIS_RETRY_AFTER_S = 5


def error_response(error: MlxqError, request: Request | None = None) -> JSONResponse:
    """The error in the shape of the protocol whose route `request` reached."""
    status, body = shape_for(request, error)
    return JSONResponse(body, status_code=status, headers=error.headers())


class RouteError(MlxqError):
    """No route, or not this method, at the path: Starlette's 404 and 405 as one of ours."""

    error_type = "invalid_request_error"

    def __init__(self, exc: HTTPException) -> None:
        super().__init__(str(exc.detail))
        self._status = exc.status_code
        self.extra_headers = dict(exc.headers or {})

    @property
    def status_code(self) -> int:  # type: ignore[override]
        return self._status

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "code": _HTTP_CODES.get(self._status, f"http_{self._status}")}


async def count_refusal(app: FastAPI, reason: str) -> None:
    """Count a refusal made before the admission script (which counts its own)."""
    try:
        await app.state.aredis.hincrby(keys.REFUSALS, reason, 1)
    except Exception as exc:
        REDIS.failed(f"counting a {reason} refusal", exc)


def log_refusal(request: Request, reason: str, status: int, retry_after_s: int | None) -> None:
    """One line per refusal: reason, client (its tag, a hash: never the key or the address) and
    Retry-After; never the prompt."""
    client = getattr(request.state, "client", None)
    logger.info(
        "refused %s %s: %s (%d), client %s, Retry-After %s",
        request.method,
        request.url.path,
        reason,
        status,
        client.tag if client is not None else "unidentified",
        retry_after_s if retry_after_s is not None else "none",
    )


def _is_submission(request: Request) -> bool:
    path = request.url.path
    return request.method == "POST" and (path.startswith("/v1/") or path in ("/api/chat", "/api/generate"))


def _validation_error(exc: RequestValidationError | ValidationError) -> InvalidRequest:
    """The first problem pydantic found, named by its field path, e.g. `messages.0.role`."""
    problems = exc.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in _NOT_AN_OBJECT:
        # No body, or one that is not JSON (text/plain, a form): nothing inside it to name.
        return InvalidRequest("The body must be a JSON object, sent as application/json", param="body")
    # Not the request's names: where the error came from ("body", "query") and which member of a
    # union pydantic tried ("str", "list[str]", "function-after[...]").
    loc = [str(part) for part in first.get("loc", ()) if part not in _SOURCES and not _UNION_TAG.match(str(part))]
    raw = str(first.get("msg", "invalid request"))
    message = raw.removeprefix("Value error, ")
    if (not loc or raw != message) and (named := _NAMED.search(message)):
        # A rule across a model's fields names the first field it is about, in backticks: the path
        # is the model's (none at the top) and that field.
        loc = [*loc, named.group(1)]
    param = ".".join(loc) or None
    if param:
        message = f"{param}: {message}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return InvalidRequest(message, param=param)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
_NOT_AN_OBJECT = {"missing", "model_attributes_type", "model_type", "dict_type"}
"""pydantic's error types for a body that is no JSON object at all (a rule across fields is not one)."""
_SOURCES = {"body", "query", "path", "header"}
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[a-z_-]+\[.*\])$")
_NAMED = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MlxqError)
    async def on_mlxq_error(request: Request, exc: MlxqError) -> JSONResponse:
        if exc.refusal and not exc.counted and _is_submission(request):
            await count_refusal(app, exc.code)
        if exc.refusal:
            log_refusal(request, exc.code, exc.status_code, exc.retry_after_s)
        return error_response(exc, request)

    # The route's own models, and the internal ones a request is translated into (the OpenAI routes).
    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        error = _validation_error(exc)
        if _is_submission(request):
            await count_refusal(app, error.code)
            log_refusal(request, error.code, error.status_code, None)
        return error_response(error, request)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, BodyRefused):
            if _is_submission(request):
                await count_refusal(app, exc.error.code)
            return error_response(exc.error, request)
        return error_response(RouteError(exc), request)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; its job was canceled

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    @app.exception_handler(RedisRefusing)
    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        if pool_exhausted(exc):
            busy = GatewayBusy("Every Redis connection of this gateway is in use; retry shortly", retry_after_s=1)
            return error_response(busy, request)
        REDIS.failed("answering a request", exc)
        down = ServiceUnavailable(f"The job store (Redis) is {condition_of(exc)}", retry_after_s=REDIS_RETRY_AFTER_S)
        return error_response(down, request)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ClientDisconnect):  # includes bodies cut off by BodySizeLimit
            logger.exception("unhandled error")
        return error_response(MlxqError("Internal error; the gateway logged the details"), request)
