"""No input gets a server error: schemathesis generates requests for every route from the OpenAPI
schema (which carries the gateway's own limits, so most reach the handlers) against a real gateway
and worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.processes import Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

EXAMPLES = 40
"""Generated cases per route and phase: about a minute and a half for the whole schema here."""


@pytest.fixture(scope="module")
def fuzzed(redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/6",
        data_dir,
        tmp_path_factory.mktemp("fuzz-logs"),
        heartbeat_interval_s=0.5,
        # Small generations, small batches and waits long enough for them: what is left to find is
        # how the gateway handles what it is sent.
        max_tokens_cap=8,
        default_max_tokens=8,
        max_batch_requests=4,
        openai_wait_s=120,
        rate_limit_requests=1_000_000,
        max_inflight_per_client=1_000_000,
        max_batch_inflight_per_client=1_000_000,
        max_queued=1_000_000,
    )
    yield svc
    svc.stop()


@pytest.mark.timeout(900)  # every route of the schema, 40 cases each
def test_no_generated_request_gets_a_server_error(fuzzed: Service) -> None:
    api = schemathesis.openapi.from_url(fuzzed.base_url + "/openapi.json")
    failures: list[str] = []
    tried = 0
    for found in api.get_all_operations():
        operation = found.ok()

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def call(case: schemathesis.Case) -> None:
            response = case.call(timeout=150)
            assert response.status_code < 500, f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}"

        try:
            call()
        except AssertionError as failure:
            failures.append(f"{operation.label}: {failure}")
        tried += 1
    assert tried >= 15, "the schema lost its routes"
    assert not failures, "\n\n".join(failures)


RAW_SEEDS = [
    b'{"model": "tiny", "prompt": "x \\ud800", "messages": [{"role": "user", "content": "x \\udfff"}]}',
    b'{"model": "tiny", "temperature": NaN}',
    b'{"model": "tiny", "max_tokens": Infinity}',
    b'{"model": "tiny", "top_p": 1e999}',
    b'{"model": "tiny", "metadata": ' + b"[" * 700 + b"]" * 700 + b"}",
    b"[" * 10_000 + b"]" * 10_000,
    b'{"model": "tiny", "x": "\xff\xfe"}',
    b"null",
    b"[]",
    b'"text"',
    b'{"model": ',
]
"""Bodies Python's JSON reader takes and nothing after it could hold (gateway/http/strict_json.py)."""


def test_raw_seeds_get_a_4xx_on_every_route_that_takes_a_body(fuzzed: Service) -> None:
    schema = fuzzed.http.get("/openapi.json").json()
    posts = [path for path, methods in schema["paths"].items() if "post" in methods and "{" not in path]
    assert len(posts) >= 10, posts
    failures = []
    for path in posts:
        for seed in RAW_SEEDS:
            for content_type in ("application/json", "text/plain"):
                response = fuzzed.http.post(path, content=seed, headers={"content-type": content_type})
                if not 400 <= response.status_code < 500:
                    answer = f"{response.status_code} {response.text[:200]}"
                    failures.append(f"{path} {content_type} {seed[:60]!r}: {answer}")
    assert not failures, "\n".join(failures)
