"""Fan-out at real size through a real gateway, worker and Redis: Victoria's batches with the
default limits, turns between clients, honest refusals, batch events, canceled children and a
synthesis prompt that outgrows its model's context."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import Gateway, Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

KEYS = {"alice": "alice-key", "bob": "bob-key", "carol": "carol-key"}
SMALL_CONTEXT = 1024


def database(redis_server: RedisServer, index: int) -> str:
    """A database of the session's server of our own, so other services' jobs never count here."""
    return redis_server.url.rsplit("/", 1)[0] + f"/{index}"


@pytest.fixture(scope="module")
def fanout(redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Admission at its defaults; three API keys, so three clients; `small` is the demo model with a
    short context."""
    models = tmp_path_factory.mktemp("fanout-models") / "models.toml"
    models.write_text(f'[models.small]\npath = "{data_dir / "models" / "tiny"}"\ncontext_tokens = {SMALL_CONTEXT}\n')
    svc = Service(
        database(redis_server, 2),
        data_dir,
        tmp_path_factory.mktemp("fanout-logs"),
        models_file=models,
        api_keys=",".join(KEYS.values()),
        heartbeat_interval_s=0.5,
        max_batch=1,  # one job at a time: the order jobs are served in is what these tests watch
    )
    yield svc
    svc.stop()


def as_client(svc: Service, who: str) -> httpx.Client:
    return httpx.Client(base_url=svc.base_url, timeout=30, headers={"Authorization": f"Bearer {KEYS[who]}"})


def children(count: int, prefix: str = "c", **extra: Any) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"Part {i}"}], "max_tokens": 2, **extra}
        for i in range(count)
    ]


def wait_batch(http: httpx.Client, batch_id: str, timeout_s: float = 240) -> dict[str, Any]:
    """The batch view once its children and synthesis have all ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        view: dict[str, Any] = http.get(f"/v1/batches/{batch_id}").json()
        synthesis_done = view["synthesis"] is None or view["synthesis"]["status"] in ("finished", "failed", "canceled")
        if view["status"] != "in_progress" and synthesis_done:
            return view
        assert time.monotonic() < deadline, {k: view[k] for k in ("status", "counts", "synthesis")}
        time.sleep(0.3)


def wait_status(http: httpx.Client, job_id: str, status: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (found := http.get(f"/v1/jobs/{job_id}").json()["status"]) != status:
        assert time.monotonic() < deadline, f"job {job_id} is {found}, not {status}"
        time.sleep(0.05)


def submit_batch(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/batches", json=body)
    assert response.status_code == 202, response.text
    created: dict[str, Any] = response.json()
    return created


def test_with_the_defaults_one_client_gets_a_60_wide_and_then_a_256_wide_fan_out_through(fanout: Service) -> None:
    synthesis = {"messages": [{"role": "user", "content": "Combine:\n{{results}}"}], "max_tokens": 2}
    with as_client(fanout, "alice") as alice:
        first = submit_batch(alice, {"model": "tiny", "requests": children(60, "a"), "synthesis": synthesis})
        second = submit_batch(alice, {"model": "tiny", "requests": children(256, "b"), "synthesis": synthesis})
        for created, width in ((first, 60), (second, 256)):
            view = wait_batch(alice, created["id"])
            assert view["counts"] == {"total": width, "finished": width}
            assert view["synthesis"]["status"] == "finished"
            prompt = view["synthesis"]["input_messages"][0]["content"]
            for child in view["requests"]:
                assert f"### Result {child['custom_id']}\n{child['result']['text']}" in prompt
            assert view["synthesis"]["truncation"]["truncated"] == []


def test_two_clients_fan_outs_are_served_in_turns(fanout: Service) -> None:
    slow = {"max_tokens": 100, "ignore_eos": True}  # Alice's 40 take far longer than the 1 s before Bob
    with as_client(fanout, "alice") as alice, as_client(fanout, "bob") as bob:
        first = submit_batch(alice, {"model": "tiny", "requests": children(40, "a", **slow)})
        time.sleep(1.0)
        second = submit_batch(bob, {"model": "tiny", "requests": children(40, "b", **slow)})
        a = wait_batch(alice, first["id"])["requests"]
        b = wait_batch(bob, second["id"])["requests"]
    b_first_start = min(c["started_at"] for c in b)
    a_before = sum(c["started_at"] < b_first_start for c in a)
    assert a_before < 40, ("Bob waited for all of Alice's fan-out", a[-1]["started_at"], b_first_start)
    # From Bob's first child on, the two take turns: of the starts that follow, Alice has at most one more
    # than Bob until one of them runs out.
    starts = sorted([(c["started_at"], "a") for c in a] + [(c["started_at"], "b") for c in b])
    after = [who for at, who in starts if at >= b_first_start]
    remaining_a = 40 - a_before
    paired = after[: 2 * min(remaining_a, 40)]
    assert abs(paired.count("a") - paired.count("b")) <= 1, after
    assert min(c["ended_at"] for c in b) < max(c["ended_at"] for c in a)


def test_a_fan_out_larger_than_a_limit_is_refused_for_good_naming_the_limit(
    fanout: Service, redis_server: RedisServer, data_dir: Path, tmp_path: Path
) -> None:
    with as_client(fanout, "carol") as carol:
        refused = carol.post("/v1/batches", json={"model": "tiny", "requests": children(257)})
    assert refused.status_code == 413
    assert "retry-after" not in refused.headers
    error = refused.json()["error"]
    assert error["code"] == "batch_too_large" and error["param"] == "requests"
    assert "257" in error["message"] and "MLXQ_MAX_BATCH_REQUESTS" in error["message"] and "256" in error["message"]

    # A queue-depth limit below the batch size: no wait could ever let the batch in either.
    gateway = Gateway(database(redis_server, 3), data_dir, tmp_path / "gateway.log", max_queued=50)
    try:
        refused = httpx.post(
            gateway.base_url + "/v1/batches", json={"model": "tiny", "requests": children(60)}, timeout=10
        )
    finally:
        gateway.stop()
    assert refused.status_code == 413 and "retry-after" not in refused.headers
    assert "MLXQ_MAX_QUEUED allows 50" in refused.json()["error"]["message"]


@pytest.mark.timeout(400)  # it waits out real Retry-Afters, longer on a loaded machine
def test_every_retry_after_comes_true_for_the_identical_request(
    redis_server: RedisServer, data_dir: Path, tmp_path: Path
) -> None:
    svc = Service(
        # A database no other test file uses: job ends left by another service would count in its drain rate.
        database(redis_server, 15),
        data_dir,
        tmp_path,
        heartbeat_interval_s=0.5,
        rate_limit_requests=3,
        rate_limit_window_s=4,
        max_batch_inflight_per_client=12,
        max_queued=14,
        queue_full_fallback_retry_after_s=3,
    )
    seen: dict[str, int] = {}
    started = time.monotonic()

    def post_until_admitted(path: str, body: dict[str, Any]) -> None:
        response = svc.http.post(path, json=body)
        if response.status_code == 202:
            return
        assert response.status_code in (429, 503), response.text
        retry_after = int(response.headers["retry-after"])
        seen[response.json()["error"]["code"]] = retry_after
        # Jobs of 2 tokens drain in seconds: a wait of minutes is a wrong estimate, named here rather
        # than slept through into the test's timeout.
        assert retry_after <= 60, (response.json(), seen, f"{time.monotonic() - started:.0f} s in")
        time.sleep(retry_after)
        again = svc.http.post(path, json=body)
        assert again.status_code == 202, (response.json(), again.text)

    try:
        batch = {"model": "tiny", "requests": children(8)}
        single = {"model": "tiny", "prompt": "One", "max_tokens": 2}
        post_until_admitted("/v1/batches", batch)
        post_until_admitted("/v1/batches", batch)  # 16 batch jobs > 12: too_many_inflight, or queue depth
        post_until_admitted("/v1/jobs", single)
        post_until_admitted("/v1/jobs", single)
        post_until_admitted("/v1/jobs", single)  # the 4th request in 4 s (or 5th): rate_limited
        post_until_admitted("/v1/jobs", single)
    finally:
        svc.stop()
    assert "rate_limited" in seen
    assert {"too_many_inflight", "queue_full"} & seen.keys(), seen


def read_events(response: httpx.Response, stop_after: int | None = None) -> list[dict[str, Any]]:
    """SSE events as {id, event, data}, up to the `end` event (or `stop_after` events)."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("event: "):
            current["event"] = line[7:]
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line == "" and current:
            events.append(current)
            current = {}
            if events[-1]["event"] == "end" or (stop_after is not None and len(events) >= stop_after):
                break
    return events


def test_batch_events_show_each_child_and_the_synthesis_text_and_resume_without_a_gap(fanout: Service) -> None:
    body = {
        "model": "tiny",
        "requests": children(5, "e", max_tokens=6, ignore_eos=True),
        "synthesis": {"messages": [{"role": "user", "content": "All:\n{{results}}"}], "max_tokens": 12},
    }
    with as_client(fanout, "carol") as carol:
        batch_id = submit_batch(carol, body)["id"]
        with carol.stream("GET", f"/v1/batches/{batch_id}/events") as first:
            assert first.status_code == 200
            head = read_events(first, stop_after=2)
        assert [e["event"] for e in head] == ["child", "child"]
        with carol.stream("GET", f"/v1/batches/{batch_id}/events", headers={"Last-Event-ID": head[-1]["id"]}) as rest:
            tail = read_events(rest)
        view = wait_batch(carol, batch_id)
    events = head + tail
    kinds = [e["event"] for e in events]
    child_events = [e["data"] for e in events if e["event"] == "child"]
    assert sorted(c["custom_id"] for c in child_events) == [f"e{i}" for i in range(5)]
    assert all(c["status"] == "finished" and c["usage"]["completion_tokens"] == 6 for c in child_events)
    assert kinds.index("children_done") == 5
    text = "".join(e["data"]["text"] for e in events if e["event"] == "synthesis_text")
    assert text == view["synthesis"]["result"]["text"]
    assert kinds[-2:] == ["synthesis_end", "end"]


def test_a_child_canceled_on_its_own_does_not_hold_the_synthesis(fanout: Service) -> None:
    with as_client(fanout, "carol") as carol:
        busy = {"model": "tiny", "prompt": "Busy", "max_tokens": 8000, "ignore_eos": True}
        blocker = carol.post("/v1/jobs", json=busy).json()["id"]
        wait_status(carol, blocker, "started")
        requests = children(3, "k")
        requests[2].update(max_tokens=8000, ignore_eos=True)
        body = {
            "model": "tiny",
            "requests": requests,
            "synthesis": {"messages": [{"role": "user", "content": "{{results}}"}], "max_tokens": 2},
        }
        created = submit_batch(carol, body)
        by_id = {c["custom_id"]: c["id"] for c in created["requests"]}
        assert carol.delete(f"/v1/jobs/{by_id['k0']}").json()["status"] == "canceled"  # while queued
        carol.delete(f"/v1/jobs/{blocker}")
        wait_status(carol, by_id["k2"], "started")
        carol.delete(f"/v1/jobs/{by_id['k2']}")  # while running
        view = wait_batch(carol, created["id"], timeout_s=60)
    assert view["synthesis"]["status"] == "finished"
    assert view["counts"] == {"total": 3, "canceled": 2, "finished": 1}
    prompt = view["synthesis"]["input_messages"][0]["content"]
    assert "### Result k0\n[CANCELED]" in prompt and "### Result k2\n[CANCELED]" in prompt


def test_a_refused_wide_batch_does_not_answer_the_small_batch_and_single_job_after_it(
    redis_server: RedisServer, data_dir: Path, tmp_path: Path
) -> None:
    svc = Service(
        database(redis_server, 5),
        data_dir,
        tmp_path,
        heartbeat_interval_s=0.5,
        max_batch_inflight_per_client=20,
        refusal_hold_s=5,
        max_batch=1,  # the blocker holds the batch children in the queue
    )
    try:
        blocker = svc.submit(model="tiny", prompt="Busy", max_tokens=8000, ignore_eos=True)
        svc.wait_for(blocker["id"], {"started"})
        assert svc.http.post("/v1/batches", json={"model": "tiny", "requests": children(10)}).status_code == 202
        wide = svc.http.post("/v1/batches", json={"model": "tiny", "requests": children(15)})
        assert wide.status_code == 429 and wide.json()["error"]["code"] == "too_many_inflight"
        assert "this request adds 15" in wide.json()["error"]["message"]
        small = svc.http.post("/v1/batches", json={"model": "tiny", "requests": children(5)})
        single = svc.http.post("/v1/jobs", json={"model": "tiny", "prompt": "One", "max_tokens": 2})
        again = svc.http.post("/v1/batches", json={"model": "tiny", "requests": children(15)})
        svc.http.delete(f"/v1/jobs/{blocker['id']}")
    finally:
        svc.stop()
    assert small.status_code == 202, small.text
    assert single.status_code == 202, single.text
    assert again.status_code == 429  # the same wide batch still cannot fit, held or not


def test_results_that_overflow_the_synthesis_context_are_cut_to_fair_shares_and_say_so(fanout: Service) -> None:
    body = {
        "model": "tiny",
        "requests": children(8, "t", max_tokens=100, ignore_eos=True),
        "synthesis": {
            "model": "small",
            "messages": [{"role": "user", "content": "Sum up:\n{{results}}"}],
            "max_tokens": 16,
        },
    }
    with as_client(fanout, "carol") as carol:
        # The demo model's files (which `small` shares) exist once a demo job has run.
        built = carol.post("/v1/jobs", json={"model": "tiny", "prompt": "build", "max_tokens": 1}).json()["id"]
        wait_status(carol, built, "finished")
        view = wait_batch(carol, submit_batch(carol, body)["id"])
    synthesis = view["synthesis"]
    assert synthesis["status"] == "finished", synthesis["error"]
    truncation = synthesis["truncation"]
    assert truncation["context_tokens"] == SMALL_CONTEXT
    assert truncation["prompt_tokens_in_full"] + 16 > SMALL_CONTEXT
    assert len(truncation["truncated"]) == 8
    share = truncation["share_tokens"]
    assert all(
        t == {"custom_id": f"t{i}", "kept_tokens": share, "total_tokens": t["total_tokens"]}
        for i, t in enumerate(truncation["truncated"])
    )
    assert synthesis["input_messages"][0]["content"].count(f"[truncated: first {share} of") == 8
    assert synthesis["result"]["usage"]["prompt_tokens"] + 16 <= SMALL_CONTEXT
