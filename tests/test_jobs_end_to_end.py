"""Submit-and-poll through real processes: gateway, worker, redis-server, the demo model."""

from __future__ import annotations

import base64
import json
import time
import zlib

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from tests.conftest import MISSING_MODEL_PATH
from tests.support.processes import Service

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello there"}]


def test_job_runs_to_finished_with_counted_tokens_and_is_stored_as_json(service: Service, redis: Redis) -> None:
    submitted = service.http.post(
        "/v1/jobs", json={"model": "tiny", "messages": HELLO, "max_tokens": 24, "ignore_eos": True}
    )
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    assert submitted.headers["Location"] == f"/v1/jobs/{job_id}"
    assert submitted.json()["status"] == "queued"
    assert submitted.json()["created_at"]

    done = service.wait_for(job_id, {"finished", "failed"})
    assert done["status"] == "finished", done
    result = done["result"]
    assert result["text"]
    assert result["finish_reason"] == "length"
    # With end-of-sequence ignored, exactly max_tokens tokens are generated.
    assert result["usage"]["completion_tokens"] == 24
    assert result["usage"]["prompt_tokens"] > 0
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + 24
    assert result["model"] == "tiny"
    assert set(result["timings"]) == {"queued_s", "load_s", "generate_s", "first_token_s", "hops_ms"}
    assert 0 < result["timings"]["first_token_s"] <= result["timings"]["load_s"] + result["timings"]["generate_s"]
    # Each hop has an owner: received and accepted by the gateway before its enqueueing, then claimed,
    # submitted, first token made and written on the worker, the whole output made.
    hops = result["timings"]["hops_ms"]
    assert list(hops) == ["received", "accepted", "claimed", "submitted", "first_token", "first_written", "generated"]
    assert hops["received"] <= hops["accepted"] <= 0 <= hops["claimed"] <= hops["submitted"]
    assert hops["submitted"] <= hops["first_token"] <= hops["first_written"]
    assert hops["first_token"] <= hops["generated"]

    queue = Queue(Job.fetch(job_id, connection=redis, serializer=JSONSerializer).origin, connection=redis)
    assert job_id in FinishedJobRegistry(queue=queue).get_job_ids()
    # RQ keeps the call (zlib-compressed) in the job hash: it must be JSON, never a pickle.
    raw = redis.hget(f"rq:job:{job_id}", "data")
    assert raw is not None
    call = json.loads(zlib.decompress(raw))
    assert call[0] == "worker.tasks.generate"
    assert call[2][0]["model"] == "tiny"
    # So is the result RQ keeps (base64 of the serializer's bytes, in a stream per job).
    entries = redis.xrevrange(f"rq:results:{job_id}", count=1)
    stored = json.loads(base64.b64decode(entries[0][1][b"return_value"]))
    assert stored["usage"]["completion_tokens"] == 24
    # And the prompt is not in the description rq-dashboard and RQ's logs show.
    assert b"Hello there" not in (redis.hget(f"rq:job:{job_id}", "description") or b"")


def test_a_stop_string_ends_generation_with_stop(service: Service) -> None:
    first = service.wait_for(
        service.submit(model="tiny", prompt="Once upon", max_tokens=40, temperature=0.0, ignore_eos=True)["id"],
        {"finished"},
    )
    text = first["result"]["text"]
    stop = text[len(text) // 2 :][:2]
    assert stop.strip(), "the greedy sample must give some text to stop on"
    again = service.wait_for(
        service.submit(model="tiny", prompt="Once upon", max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])[
            "id"
        ],
        {"finished"},
    )
    assert again["result"]["finish_reason"] == "stop"
    assert again["result"]["text"] == text[: text.index(stop)]


def test_worker_keeps_its_model_loaded_between_jobs(service: Service) -> None:
    first = service.wait_for(service.submit(model="tiny", messages=HELLO, max_tokens=4)["id"], {"finished"})
    second = service.wait_for(service.submit(model="tiny", messages=HELLO, max_tokens=4)["id"], {"finished"})
    assert first["result"]["usage"]["completion_tokens"] >= 0
    assert second["result"]["timings"]["load_s"] == 0.0
    health = service.http.get("/health").json()
    assert any(m["name"] == "tiny" for w in health["workers"] for m in w["models"])


def test_delete_stops_a_long_generation_within_a_second(service: Service) -> None:
    job = service.submit(model="tiny", prompt="Tell me everything", max_tokens=30_000, ignore_eos=True)
    service.wait_for(job["id"], {"started"})
    time.sleep(0.5)  # well into the token loop

    asked = time.monotonic()
    response = service.http.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code in (200, 202), response.text
    canceled = service.wait_for(job["id"], {"canceled", "finished", "failed"}, timeout_s=5)
    took = time.monotonic() - asked
    assert canceled["status"] == "canceled", canceled
    assert took < 1.0, f"cancel took {took:.2f} s"

    # The worker is free again: the next job runs.
    after = service.wait_for(
        service.submit(model="tiny", messages=HELLO, max_tokens=4)["id"], {"finished"}, timeout_s=20
    )
    assert after["status"] == "finished"


def test_a_queued_job_can_be_canceled_and_never_runs(service: Service) -> None:
    blocker = service.submit(model="tiny", prompt="Keep going", max_tokens=30_000, ignore_eos=True)
    service.wait_for(blocker["id"], {"started"})
    waiting = service.submit(model="tiny", messages=HELLO, max_tokens=4)
    assert service.job(waiting["id"])["position"] == 0

    response = service.http.delete(f"/v1/jobs/{waiting['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"

    service.http.delete(f"/v1/jobs/{blocker['id']}")
    service.wait_for(blocker["id"], {"canceled"}, timeout_s=5)
    time.sleep(0.3)
    view = service.job(waiting["id"])
    assert view["status"] == "canceled"
    assert view["started_at"] is None


def test_deleting_a_finished_job_is_a_conflict(service: Service) -> None:
    done = service.wait_for(service.submit(model="tiny", messages=HELLO, max_tokens=2)["id"], {"finished"})
    response = service.http.delete(f"/v1/jobs/{done['id']}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_already_ended"


def test_a_model_whose_local_path_is_missing_is_refused_before_it_is_queued(service: Service) -> None:
    refused = service.http.post("/v1/jobs", json={"model": "missing", "messages": HELLO})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "model_files_missing" and error["param"] == "model"
    assert MISSING_MODEL_PATH in error["message"] and "does not exist" in error["message"]
    assert "retry-after" not in refused.headers


def test_a_model_whose_files_cannot_be_loaded_fails_with_a_clear_error(service: Service) -> None:
    failed = service.wait_for(service.submit(model="broken", messages=HELLO)["id"], {"failed", "finished"})
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "model_unavailable"
    # The worker survives it.
    assert service.wait_for(service.submit(model="tiny", messages=HELLO, max_tokens=2)["id"], {"finished"})


def test_models_lists_demo_and_flags_a_missing_path(service: Service) -> None:
    body = service.http.get("/v1/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["tiny"]["object"] == "model"
    assert by_id["tiny"]["problem"] is None
    assert "does not exist" in by_id["missing"]["problem"]


def test_health_keeps_the_shape_operators_script_against(service: Service) -> None:
    response = service.http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] in {"healthy", "warning", "critical"}
    assert set(body["memory"]) >= {
        "used_percent",
        "available_gb",
        "total_gb",
        "warning_threshold",
        "critical_threshold",
    }
    assert body["memory"]["warning_threshold"] == 85.0
    assert body["memory"]["critical_threshold"] == 95.0
    assert len(body["workers"]) == 1


def test_a_job_enqueued_around_the_gateway_with_bad_arguments_fails_cleanly(service: Service, redis: Redis) -> None:
    queue = Queue("mlxq-jobs", connection=redis, serializer=JSONSerializer)
    job = queue.enqueue("worker.tasks.generate", {"model": "tiny", "messages": [], "secret": "do-not-log-me"})
    failed = service.wait_for(job.id, {"failed", "finished"})
    assert failed["error"]["code"] == "invalid_request"
    assert "messages" in failed["error"]["message"]
    assert "do-not-log-me" not in failed["error"]["message"]
    assert "do-not-log-me" not in service.worker.log.read_text()
    # The worker lives on.
    assert service.wait_for(service.submit(model="tiny", messages=HELLO, max_tokens=2)["id"], {"finished"})
