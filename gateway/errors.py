"""Every refusal as OpenAI-style JSON: `{"error": {"message", "type", "code", "param"}}`."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from shared import keys
from shared.errors import InvalidRequest, MlxqError, ServiceUnavailable
from shared.outage import REDIS

logger = logging.getLogger(__name__)

REDIS_RETRY_AFTER_S = 5


def error_response(error: MlxqError, request: Request | None = None) -> JSONResponse:
    """OpenAI's error body; on Ollama's routes (`/api/*`), Ollama's: `{"error": "<message>"}`."""
    body: dict[str, Any] = error.to_body()
    if request is not None and request.url.path.startswith("/api/"):
        body = {"error": error.message}
    elif request is not None and request.url.path == "/v1/messages":
        kind = {"server_error": "api_error", "invalid_request_error": "invalid_request_error"}.get(error.error_type)
        body = {"type": "error", "error": {"type": kind or error.error_type, "message": error.message}}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers())


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
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "code": _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}"),
                "param": None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        REDIS.failed("answering a request", exc)
        return error_response(
            ServiceUnavailable("The job store (Redis) is unavailable", retry_after_s=REDIS_RETRY_AFTER_S), request
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ClientDisconnect):  # includes bodies cut off by BodySizeLimit
            logger.exception("unhandled error")
        return error_response(MlxqError("Internal error; the gateway logged the details"), request)
