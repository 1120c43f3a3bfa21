"""Bodies Python's JSON reader lets through but nothing after it can hold (gateway/http/strict_json.py):
a lone surrogate, NaN and infinities, deep nesting, invalid UTF-8, bodies that are not an object.
Each is a 4xx naming the field (or `body`), the same on every route that takes it, in the route's
own error shape; never a 500. Real gateway, worker and Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.processes import Service

pytestmark = pytest.mark.slow

ROUTES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "CONTENT"}]},
    "/v1/completions": {"model": "tiny", "prompt": "CONTENT"},
    "/v1/jobs": {"model": "tiny", "messages": [{"role": "user", "content": "CONTENT"}]},
    "/v1/batches": {"requests": [{"model": "tiny", "messages": [{"role": "user", "content": "CONTENT"}]}]},
    "/v1/messages": {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "CONTENT"}]},
    "/v1/responses": {"model": "tiny", "input": "CONTENT"},
    "/api/chat": {"model": "tiny", "messages": [{"role": "user", "content": "CONTENT"}]},
    "/api/generate": {"model": "tiny", "prompt": "CONTENT"},
}
"""Each route with a body whose text is CONTENT, to be replaced by raw JSON."""


def raw(route: str, content_json: str) -> bytes:
    """The route's body with its text given as raw JSON (what json.dumps would never write)."""
    return json.dumps(ROUTES[route]).replace('"CONTENT"', content_json).encode()


def error_of(route: str, response: Any) -> tuple[str | None, str]:
    """(param, message) of an error in the route's protocol shape."""
    body = response.json()
    if route.startswith("/api/"):
        return None, body["error"]
    if route == "/v1/messages":
        assert body["type"] == "error", body
        return None, body["error"]["message"]
    return body["error"]["param"], body["error"]["message"]


def expected_status(route: str) -> int:
    return 400 if route == "/v1/messages" else 422


def post(service: Service, route: str, data: bytes, content_type: str = "application/json") -> Any:
    return service.http.post(route, content=data, headers={"content-type": content_type, "anthropic-version": "1"})


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_lone_surrogate_is_refused_naming_its_field(service: Service, route: str) -> None:
    response = post(service, route, raw(route, '"x \\ud800"'))
    assert response.status_code == expected_status(route), response.text
    param, message = error_of(route, response)
    assert "surrogate" in message
    if param is not None:
        assert param.endswith(("content", "prompt", "input")), param


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/jobs", "/v1/messages", "/api/chat"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinities_are_refused_naming_the_field(service: Service, route: str, literal: str) -> None:
    body = json.dumps({**ROUTES[route], "temperature": "T"}).replace('"T"', literal).replace('"CONTENT"', '"hi"')
    response = post(service, route, body.encode())
    assert response.status_code == expected_status(route), response.text
    param, message = error_of(route, response)
    assert "not a number JSON allows" in message
    assert param in (None, "temperature")


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("depth", [600, 10_000])
def test_deep_nesting_is_refused(service: Service, route: str, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = json.dumps({**ROUTES[route], "metadata": "M"}).replace('"M"', nested).replace('"CONTENT"', '"hi"')
    response = post(service, route, body.encode())
    assert response.status_code == expected_status(route), response.text
    assert "deeper than" in error_of(route, response)[1]


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    ("data", "content_type", "words"),
    [
        (b'{"model": "tiny", "x": "\xff\xfe"}', "application/json", "not valid UTF-8"),
        (b"null", "application/json", "must be a JSON object"),
        (b"[]", "application/json", "must be a JSON object"),
        (b'"text"', "application/json", "must be a JSON object"),
        (b"hello", "text/plain", "must be a JSON object"),
        (b'{"model": ', "application/json", "not valid JSON"),
    ],
    ids=["invalid-utf8", "null", "array", "string", "text-plain", "cut-short"],
)
def test_bodies_that_are_not_a_json_object_are_refused_naming_the_body(
    service: Service, route: str, data: bytes, content_type: str, words: str
) -> None:
    response = post(service, route, data, content_type)
    assert response.status_code == expected_status(route), response.text
    param, message = error_of(route, response)
    assert words in message, message
    assert param in (None, "body")


@pytest.mark.parametrize("num_predict", [0, -7, "many"])
def test_ollama_errors_name_its_own_option(service: Service, num_predict: object) -> None:
    body = {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": num_predict}}
    response = service.http.post("/api/generate", json=body)
    assert 400 <= response.status_code < 500, response.text
    message = response.json()["error"]
    assert message.startswith("options.num_predict") and "max_tokens" not in message, message
