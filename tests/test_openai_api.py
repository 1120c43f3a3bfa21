"""The OpenAI-compatible API through the official `openai` package, a real gateway and worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis import Redis

from shared import job_stream, keys
from tests.support.processes import Gateway, Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key="not-needed", max_retries=0)


def job_id_of(completion_id: str) -> str:
    return completion_id.split("-", 1)[1]


def test_a_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8)  # type: ignore[arg-type]
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.prompt_tokens and reply.usage.completion_tokens <= 8


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_completion_tokens=5,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_a_text_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, seed=7)
    assert reply.object == "text_completion"
    assert isinstance(reply.choices[0].text, str)
    assert reply.usage is not None and reply.usage.completion_tokens <= 6


def test_models_list_says_each_models_context_length(client: openai.OpenAI) -> None:
    [demo] = [model for model in client.models.list() if model.id == "tiny"]
    assert demo.max_model_len == demo.max_context_length == 32768  # type: ignore[attr-defined]


def test_a_streamed_chat_reaches_the_client_before_generation_ends(client: openai.OpenAI, service: Service) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=2000,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first_text_at: datetime | None = None
    pieces: list[str] = []
    finish = usage = None
    completion_id = ""
    for chunk in stream:
        completion_id = chunk.id
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first_text_at = first_text_at or datetime.now(UTC)
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    job = service.job(job_id_of(completion_id))
    assert first_text_at is not None
    assert first_text_at < datetime.fromisoformat(job["ended_at"]), "first chunk only after the generation ended"
    assert "".join(pieces) == job["result"]["text"]
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 2000


def test_a_streaming_client_that_hangs_up_cancels_its_job(service: Service) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 30_000, "stream": True, "ignore_eos": True}
    with service.http.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["x-mlxq-job-id"]
        lines = response.iter_lines()
        seen = 0
        while seen < 5:
            if next(lines).startswith("data: "):
                seen += 1
    canceled = service.wait_for(job_id, {"canceled", "finished", "failed"}, timeout_s=10)
    assert canceled["status"] == "canceled"
    after = service.wait_for(service.submit(model="tiny", messages=HELLO, max_tokens=3)["id"], {"finished"})
    assert after["status"] == "finished"


def test_n_other_than_one_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="tiny", messages=HELLO, n=2)  # type: ignore[arg-type]
    assert caught.value.body["code"] == "invalid_request"  # type: ignore[index]
    assert caught.value.body["param"] == "n"  # type: ignore[index]


def test_an_unknown_model_is_openais_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, data_dir: Path) -> Iterator[Service]:
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/4", data_dir, tmp_path_factory.mktemp("impatient"), openai_wait_s=1
    )
    yield svc
    svc.stop()


def test_a_call_past_its_wait_limit_is_504_with_a_job_id_that_later_finishes(impatient: Service) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 5000, "ignore_eos": True}
    response = impatient.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 504
    error = response.json()["error"]
    job_id = response.headers["x-mlxq-job-id"]
    assert error["code"] == "timeout" and job_id in error["message"]
    done = impatient.wait_for(job_id, {"finished", "failed"}, timeout_s=60)
    assert done["status"] == "finished"
    assert done["result"]["usage"]["completion_tokens"] == 5000


def test_job_events_stream_status_and_text_and_resume_after_last_event_id(service: Service) -> None:
    job = service.submit(model="tiny", prompt="Count", max_tokens=30, ignore_eos=True)
    events = read_sse(service, f"/v1/jobs/{job['id']}/events")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end"
    assert "started" in [e["data"].get("status") for e in events if e["event"] == "status"]
    text = "".join(e["data"]["text"] for e in events if e["event"] == "text")
    assert text == events[-1]["data"]["result"]["text"]
    middle = [e for e in events if e["event"] == "text"][2]
    resumed = read_sse(service, f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": middle["id"]})
    assert resumed[0]["id"] > middle["id"]
    assert [e["id"] for e in resumed] == [e["id"] for e in events if e.get("id", "") > middle["id"]]


@pytest.mark.parametrize("stream", [True, False])
def test_a_call_that_waits_for_its_whole_answer_has_no_tokens_written_to_its_stream(
    client: openai.OpenAI, service: Service, redis: Redis, stream: bool
) -> None:
    """Each token in a job's stream costs the engine CPU on its way out: a non-streamed call's job writes
    only its status and end there, and its answer is the same; a streamed one writes every piece."""
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 0, "stream": stream}
    with service.http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as reply:
        reply.read()
        job_id = reply.headers["x-mlxq-job-id"]
    written = [job_stream.decode(fields) for _, fields in redis.xrange(keys.job_stream(job_id))]
    kinds = [kind for kind, _ in written]
    end = written[-1][1]
    assert kinds[-1] == "end" and end["status"] == "finished"
    if stream:
        assert "".join(data["text"] for kind, data in written if kind == "text") == end["result"]["text"] != ""
        return
    assert set(kinds) == {"status", "end"}
    assert "first_written" not in end["result"]["timings"]["hops_ms"]
    streamed = client.chat.completions.create(**{**body, "stream": True})  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == end["result"]["text"] != ""


def read_sse(service: Service, path: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with service.http.stream("GET", path, headers=headers or {}, timeout=30) as response:
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
                continue
            name, _, value = line.partition(": ")
            current[name] = json.loads(value) if name == "data" else value
    return events


def test_the_same_idempotency_key_and_body_give_the_same_job_and_another_body_409(service: Service) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
    key = {"Idempotency-Key": f"test-{time.time_ns()}"}
    first = service.http.post("/v1/jobs", json=body, headers=key)
    again = service.http.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = service.http.post("/v1/jobs", json={**body, "max_tokens": 3}, headers=key)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"


def test_a_job_cannot_ask_for_a_higher_priority_than_its_route(service: Service) -> None:
    response = service.http.post("/v1/jobs", json={"model": "tiny", "prompt": "x", "priority": "interactive"})
    assert response.status_code == 422


def test_an_interactive_call_queued_after_ten_batch_children_runs_before_them(service: Service) -> None:
    blocker = service.submit(model="tiny", prompt="Busy", max_tokens=30_000, ignore_eos=True)
    service.wait_for(blocker["id"], {"started"})
    batch = service.http.post(
        "/v1/batches", json={"model": "tiny", "requests": [{"messages": HELLO, "max_tokens": 2} for _ in range(10)]}
    ).json()
    answer: dict[str, Any] = {}

    def call() -> None:
        body = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
        answer["response"] = httpx.post(service.base_url + "/v1/chat/completions", json=body, timeout=60)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while service.http.get("/health").json()["queues"].get("mlxq-interactive", 0) < 1:
        assert time.monotonic() < deadline, "the interactive call never reached its queue"
        time.sleep(0.05)
    service.http.delete(f"/v1/jobs/{blocker['id']}")
    caller.join(60)
    interactive = service.job(answer["response"].headers["x-mlxq-job-id"])
    children = service.http.get(f"/v1/batches/{batch['id']}").json()["requests"]
    deadline = time.monotonic() + 30
    while any(c["status"] != "finished" for c in children):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        children = service.http.get(f"/v1/batches/{batch['id']}").json()["requests"]
    assert all(interactive["started_at"] < c["started_at"] for c in children)


def test_a_batch_of_five_feeds_its_synthesis_and_reports_a_failed_child(service: Service) -> None:
    requests: list[dict[str, Any]] = [
        {
            "custom_id": f"r{i}",
            "messages": [{"role": "user", "content": f"Part {i}"}],
            "max_tokens": 6,
            "ignore_eos": True,
        }
        for i in range(4)
    ]
    requests.append({"custom_id": "broken", "model": "broken", "messages": HELLO})
    synthesis = {
        "messages": [{"role": "user", "content": "Combine these:\n{{results}}\nFirst alone: {{result:r0}}"}],
        "max_tokens": 4,
    }
    created = service.http.post("/v1/batches", json={"model": "tiny", "requests": requests, "synthesis": synthesis})
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 60
    view = created.json()
    while view["synthesis"]["status"] not in ("finished", "failed"):
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
        view = service.http.get(f"/v1/batches/{batch_id}").json()
    assert view["synthesis"]["status"] == "finished"
    assert view["counts"] == {"total": 5, "finished": 4, "failed": 1}
    by_id = {r["custom_id"]: r for r in view["requests"]}
    assert by_id["broken"]["error"]["code"] == "model_unavailable"
    prompt = view["synthesis"]["input_messages"][0]["content"]
    for i in range(4):
        assert f"### Result r{i}\n{by_id[f'r{i}']['result']['text']}" in prompt
    assert "### Result broken\n[FAILED: " in prompt
    assert prompt.endswith(f"First alone: {by_id['r0']['result']['text']}")
    assert view["status"] == "completed"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_a_parameter_that_would_be_ignored_is_refused_naming_it(
    service: Service, extra: dict[str, object], named: str
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    response = service.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == named


def test_parameters_that_change_nothing_or_ask_for_nothing_are_accepted(service: Service) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"k": "v"},
        "logprobs": False,
        "response_format": {"type": "text"},
        "top_k": 1,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logit_bias": {"5": -100},
    }
    response = service.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


def test_the_sdk_retrieves_one_model_and_a_missing_one_is_a_404(client: openai.OpenAI) -> None:
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_an_openai_file_batch_body_is_told_this_is_the_fan_out_api(service: Service) -> None:
    body = {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    response = service.http.post("/v1/batches", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "input_file_id" and "fan-out" in error["message"]


def test_a_stream_waiting_in_the_queue_gets_pings(service: Service) -> None:
    busy = service.submit(model="tiny", prompt="Long", max_tokens=30_000, ignore_eos=True)["id"]
    service.wait_for(busy, {"started"})
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    pinged = None
    try:
        with httpx.stream("POST", service.base_url + "/v1/chat/completions", json=body, timeout=30) as response:
            asked = time.monotonic()
            for line in response.iter_lines():
                if line == ": ping":
                    pinged = time.monotonic() - asked
                    break
                assert time.monotonic() - asked < 15, "no ping while the stream waited"
    finally:
        service.http.delete(f"/v1/jobs/{busy}")
    assert pinged is not None and pinged < 8


def test_cors_answers_the_configured_origins_only(redis_server: RedisServer, data_dir: Path, tmp_path: Path) -> None:
    gateway = Gateway(
        redis_server.url.rsplit("/", 1)[0] + "/13",
        data_dir,
        tmp_path / "gateway.log",
        cors_origins="https://chat.example",
    )
    try:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = httpx.options(
            gateway.base_url + "/v1/chat/completions", headers={"Origin": "https://chat.example", **preflight}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://chat.example"
        other = httpx.options(
            gateway.base_url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in other.headers
        refused = httpx.post(gateway.base_url + "/v1/jobs", json={}, headers={"Origin": "https://chat.example"})
        assert refused.status_code == 422  # a refusal a browser may read: it carries the CORS header
        assert refused.headers["access-control-allow-origin"] == "https://chat.example"
    finally:
        gateway.stop()


def test_logprobs_have_one_entry_per_generated_token_streamed_or_not(client: openai.OpenAI) -> None:
    asked = {"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 0}
    reply = client.chat.completions.create(**asked, logprobs=True, top_logprobs=3)  # type: ignore[call-overload]
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-4  # greedy: the token is the likeliest
    streamed = []
    for chunk in client.chat.completions.create(**asked, logprobs=True, stream=True):  # type: ignore[call-overload]
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [i.token for i in streamed] == [i.token for i in content]
    text = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.token_logprobs) == text.usage.completion_tokens
    assert all(len(top) == 2 for top in text.choices[0].logprobs.top_logprobs)


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 8}},
    "required": ["ok", "name"],
    "additionalProperties": False,
}


def test_a_json_schema_response_validates_even_from_the_random_demo_model(client: openai.OpenAI) -> None:
    import jsonschema

    format_ = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=200,
            seed=seed,
            response_format=format_,  # type: ignore[arg-type]
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), SCHEMA)
        assert reply.choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def batched_service(
    redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    svc = Service(redis_server.url.rsplit("/", 1)[0] + "/14", data_dir, tmp_path_factory.mktemp("formats"), max_batch=4)
    yield svc
    svc.stop()


def test_a_batch_child_and_a_chat_call_with_different_formats_share_an_engine_batch(
    batched_service: Service,
) -> None:
    import jsonschema

    other = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    busy = batched_service.submit(model="tiny", prompt="busy", max_tokens=3000, ignore_eos=True)["id"]
    batched_service.wait_for(busy, {"started"})  # the batch is open: both join it
    created = batched_service.http.post(
        "/v1/batches",
        json={
            "model": "tiny",
            "requests": [
                {
                    "custom_id": "verdict",
                    "messages": HELLO,
                    "max_tokens": 200,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}},
                }
            ],
        },
    ).json()
    chat = batched_service.http.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": HELLO,
            "max_tokens": 200,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": other}},
        },
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    jsonschema.validate(json.loads(chat.json()["choices"][0]["message"]["content"]), other)
    child = batched_service.wait_for(created["requests"][0]["id"], {"finished"})
    jsonschema.validate(json.loads(child["result"]["text"]), SCHEMA)
    chat_job = batched_service.job(chat.headers["x-mlxq-job-id"])
    running = batched_service.job(busy)
    assert running["status"] == "started" and chat_job["started_at"] and child["started_at"]  # all three at once
    batched_service.http.delete(f"/v1/jobs/{busy}")


def test_top_k_1_through_the_sdk_equals_greedy(client: openai.OpenAI) -> None:
    asked = {"model": "tiny", "messages": HELLO, "max_tokens": 8}
    greedy = client.chat.completions.create(**asked, temperature=0)  # type: ignore[call-overload]
    top_1 = client.chat.completions.create(**asked, temperature=1.0, extra_body={"top_k": 1})  # type: ignore[call-overload]
    assert top_1.choices[0].message.content == greedy.choices[0].message.content


def test_an_unsupported_schema_feature_is_a_422_naming_it(service: Service) -> None:
    body = {
        "model": "tiny",
        "messages": HELLO,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {"type": "string"}}}},
    }
    response = service.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert '"if"' in response.json()["error"]["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_a_forced_tool_call_returns_tool_calls_whose_arguments_validate(client: openai.OpenAI) -> None:
    import jsonschema

    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        reply = client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=200,
            tools=[WEATHER],
            tool_choice=choice,  # type: ignore[arg-type]
        )
        [call] = reply.choices[0].message.tool_calls or []
        assert reply.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_a_streamed_tool_call_assembles_to_the_same_and_the_conversation_goes_on(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    asked = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "tools": [WEATHER, CLOCK], "tool_choice": named}
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**asked, stream=True, seed=3):  # type: ignore[call-overload]
        for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            call = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            call["name"] += delta_call.function.name or ""
            call["arguments"] += delta_call.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    whole = client.chat.completions.create(**asked, seed=3)  # type: ignore[call-overload]
    [call] = whole.choices[0].message.tool_calls or []
    assert finish == "tool_calls"
    assert calls == {0: {"name": call.function.name, "arguments": call.function.arguments}}
    # The tool's answer goes back as a `tool` message after the assistant's call.
    follow_up = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    reply = client.chat.completions.create(model="tiny", messages=follow_up, max_tokens=4, tools=[WEATHER])  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_naming_a_function_not_offered_is_a_422(service: Service) -> None:
    body = {
        "model": "tiny",
        "messages": HELLO,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "launch"}},
    }
    response = service.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 422 and "launch" in response.json()["error"]["message"]


def test_logprobs_of_impossible_tokens_are_reported_as_openai_does(service: Service) -> None:
    body = {
        "model": "tiny",
        "messages": HELLO,
        "max_tokens": 200,
        "logprobs": True,
        "top_logprobs": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}},
    }
    response = service.http.post("/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    masked = [alt["logprob"] for item in content for alt in item["top_logprobs"] if alt["logprob"] == -9999.0]
    assert masked, "the schema leaves one token possible at some steps: the others are impossible"


def test_a_repetition_penalty_out_of_range_is_a_422(service: Service) -> None:
    body = {"model": "tiny", "prompt": "0", "repetition_penalty": 5e-324, "logprobs": 0}
    response = service.http.post("/v1/completions", json=body)
    assert response.status_code == 422 and response.json()["error"]["param"] == "repetition_penalty"


def test_special_tokens_are_counted_but_never_in_the_text(client: openai.OpenAI) -> None:
    """OpenAI's `skip_special_tokens` default: a special token the model makes (`<|fim_pad|>` here, a
    scripted model's answer) is a completion token, and not text, streamed or whole."""
    asked = {"model": "special", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10}
    whole = client.chat.completions.create(**asked)  # type: ignore[call-overload]
    assert whole.choices[0].message.content == "It is four."
    assert whole.usage is not None and whole.usage.completion_tokens == 3
    streamed = client.chat.completions.create(**asked, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "It is four."
