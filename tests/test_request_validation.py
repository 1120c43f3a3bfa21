"""Bad input is refused with 4xx and an OpenAI-style error body, never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.processes import Service

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hi"}]


def assert_openai_error(response: Any, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_unknown_model_is_404_model_not_found(service: Service) -> None:
    response = service.http.post("/v1/jobs", json={"model": "gpt-17", "messages": HELLO})
    error = assert_openai_error(response, 404, "model_not_found", "model")
    assert "gpt-17" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": "many"}, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": HELLO, "temperature": 7}, "temperature"),
        ({"model": "tiny", "messages": "hello"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "tiny", "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": 42, "messages": HELLO}, "model"),
        ({"messages": HELLO}, "model"),
        ({"model": "tiny", "messages": HELLO, "bogus": 1}, "bogus"),
    ],
)
def test_malformed_fields_are_422_naming_the_field(service: Service, body: dict[str, Any], param: str) -> None:
    response = service.http.post("/v1/jobs", json=body)
    assert_openai_error(response, 422, "invalid_request", param)


def test_prompt_and_messages_together_are_422(service: Service) -> None:
    response = service.http.post("/v1/jobs", json={"model": "tiny", "messages": HELLO, "prompt": "x"})
    error = assert_openai_error(response, 422, "invalid_request")
    assert "exactly one" in error["message"]


def test_max_tokens_above_what_the_context_allows_is_a_ceiling(service: Service) -> None:
    response = service.http.post("/v1/jobs", json={"model": "tiny", "messages": HELLO, "max_tokens": 10**9})
    assert response.status_code == 202, response.text
    # The service's cap is 100000; the demo model's context of 32768 less the prompt is lower.
    assert 32000 < int(response.headers["x-mlxq-max-tokens"]) < 32768
    service.http.delete(f"/v1/jobs/{response.json()['id']}")


def test_a_body_that_is_not_json_is_422(service: Service) -> None:
    response = service.http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(response, 422, "invalid_request")


def test_unknown_job_is_404(service: Service) -> None:
    assert_openai_error(service.http.get("/v1/jobs/no-such-job"), 404, "job_not_found", "id")
    assert_openai_error(service.http.delete("/v1/jobs/no-such-job"), 404, "job_not_found", "id")


def test_unknown_route_is_404_in_openai_shape(service: Service) -> None:
    assert_openai_error(service.http.get("/v1/nothing-here"), 404, "not_found")
