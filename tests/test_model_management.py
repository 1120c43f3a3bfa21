"""Models as an operator manages them, through the real stack: pulls from a hub (a local server that
speaks the hub's file protocol, fetched by the real huggingface_hub client and mlxq's own resumable
transfer), the live registry, pin, warm, keep_alive, per-model defaults, Ollama's model management
through the official `ollama` client, and the `mlxq` command run as a program."""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.fake_hub import FakeHub
from tests.support.processes import ROOT, Process, Service
from tests.support.redis_servers import free_port
from worker.demo_model import build_tiny_model

pytestmark = pytest.mark.slow

MLXQ = str(Path(sys.executable).parent / "mlxq")


def wait_until(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not so after {timeout_s} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real model (the demo's random weights) to serve from the fake hub and to add by path."""
    directory = tmp_path_factory.mktemp("hub-model") / "tiny"
    build_tiny_model(directory)
    return directory


@pytest.fixture(scope="module")
def hub(model_dir: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        for repo in ("team/tiny", "team/slow", "team/resumed", "team/waited", "team/cli"):
            fake.add_repo(repo, model_dir)
        fake.add_sized_repo("team/huge", {"config.json": 420, "model.safetensors": 80_000_000_000})
        yield fake


def hub_env(hub: FakeHub, home: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1"}


@pytest.fixture(scope="module")
def stack(
    redis_server: Any, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Path, Path]]:
    """A gateway and a worker on a database of their own, a models file to edit while they run, and
    an empty hub cache."""
    root = tmp_path_factory.mktemp("managed")
    models_file = root / "models.toml"
    models_file.write_text("# empty: models come from the API\n")
    home = root / "hf-home"
    service = Service(
        redis_server.url.rsplit("/", 1)[0] + "/9",
        root / "data",
        root,
        env=hub_env(hub, home),
        models_file=models_file,
        heartbeat_interval_s=0.5,
        maintenance_interval_s=0.5,
        rate_limit_requests=100_000,
        max_inflight_per_client=10_000,
    )
    yield service, models_file, home
    service.stop()


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_a_pull_streams_ollama_progress_then_the_model_answers_a_chat(
    stack: tuple[Service, Path, Path], model_dir: Path
) -> None:
    service, _, home = stack
    client = ollama.Client(host=service.base_url)
    progress = list(client.pull("hf.co/team/tiny", stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    sized = [p for p in progress if p.total]
    assert sized and sized[-1].completed == sized[-1].total == 430_922 + 420 + 21_423 + 806, sized
    # registered under the name it was pulled as, its files in the pull's directory, byte for byte
    names = [m.model for m in client.list().models]
    assert "hf.co/team/tiny" in names
    pulled = home / "hub" / "mlxq-pulls" / "team--tiny"
    assert filecmp.cmp(pulled / "model.safetensors", model_dir / "model.safetensors", shallow=False)
    answer = client.chat(
        model="hf.co/team/tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4}
    )
    assert answer.done and answer.eval_count and answer.eval_count <= 4


def test_a_model_too_big_for_the_budget_is_refused_before_any_byte(
    stack: tuple[Service, Path, Path], hub: FakeHub
) -> None:
    service, _, _ = stack
    refused = service.http.post("/v1/admin/models/pull", json={"repo": "team/huge"})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_too_large" and "80.00 GB" in error["message"] and "budget" in error["message"]
    assert "Retry-After" not in refused.headers
    assert hub.body_requests("team/huge") == []
    # Ollama's route says the same in Ollama's shape
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=service.base_url).pull("team/huge")
    assert "budget" in str(caught.value)
    assert hub.body_requests("team/huge") == []
    # and a repo the hub does not have is a 404 naming it
    missing = service.http.post("/v1/admin/models/pull", json={"repo": "team/nothing"})
    assert missing.status_code == 404 and "team/nothing" in missing.json()["error"]["message"]


def test_an_interrupted_pull_resumes_where_it_stopped(
    stack: tuple[Service, Path, Path], hub: FakeHub, model_dir: Path, tmp_path: Path
) -> None:
    service, _, home = stack
    hub.throttle["model.safetensors"] = 1.0  # a second per 64 KiB: about 7 s for the weights
    try:
        started = service.http.post("/v1/admin/models/pull", json={"repo": "team/resumed"})
        assert started.status_code == 202, started.text
        part = home / "hub" / "mlxq-pulls" / "team--resumed" / "model.safetensors.part"
        wait_until("some weights arrived", lambda: part.exists() and part.stat().st_size >= 128 * 1024)
        service.worker.popen.send_signal(signal.SIGKILL)  # the process doing the pull dies mid-file
        service.worker.popen.wait(10)
        had = part.stat().st_size
        hub.throttle.pop("model.safetensors")
        service.worker = Process("worker", service.env, tmp_path / "worker-2.log")
        record = wait_until(
            "the pull is done",
            lambda: (r := service.http.get("/v1/admin/pulls/team/resumed").json())["state"] == "done" and r,
            timeout_s=90,
        )
        assert record["done_bytes"] >= record["total_bytes"] > 0
    finally:
        hub.throttle.pop("model.safetensors", None)
    ranges = [rng for path, rng in hub.body_requests("team/resumed") if path == "model.safetensors"]
    assert ranges[0] is None and ranges[-1] is not None, ranges
    resumed_from = int(ranges[-1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= had, (ranges, had)
    weights = home / "hub" / "mlxq-pulls" / "team--resumed" / "model.safetensors"
    assert filecmp.cmp(weights, model_dir / "model.safetensors", shallow=False)
    answered = service.http.post(
        "/v1/chat/completions",
        json={"model": "team/resumed", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
        timeout=60,
    )
    assert answered.status_code == 200, answered.text


def test_a_job_for_a_model_still_downloading_waits_in_its_queue(
    stack: tuple[Service, Path, Path], hub: FakeHub
) -> None:
    service, _, _ = stack
    added = service.http.put("/v1/admin/models/waited", json={"repo": "team/waited"})
    assert added.status_code == 200, added.text
    hub.throttle["model.safetensors"] = 0.5
    try:
        job = wait_until(
            "the model is in the registry",
            lambda: (
                (
                    r := service.http.post("/v1/jobs", json={"model": "waited", "prompt": "x", "max_tokens": 3})
                ).status_code
                == 202
                and r.json()
            ),
            timeout_s=10,
        )
        view = service.job(job["id"])
        assert view["status"] == "queued", view
        assert view["waiting_for"]["pull"]["state"] in ("queued", "downloading"), view
        # the worker is not held: a job for another model finishes meanwhile
        other = service.submit(model="tiny", prompt="y", max_tokens=2)
        assert service.wait_for(other["id"], ["finished", "failed"], 60)["status"] == "finished"
        assert service.job(job["id"])["status"] == "queued"
    finally:
        hub.throttle.pop("model.safetensors", None)
    done = service.wait_for(job["id"], ["finished", "failed"], 90)
    assert done["status"] == "finished", done


def test_the_registry_is_live_for_the_file_and_the_api(stack: tuple[Service, Path, Path], model_dir: Path) -> None:
    service, models_file, _ = stack
    models_file.write_text(f'[models.from-file]\npath = "{model_dir}"\nnotes = "added while running"\n')
    wait_until("the file's model is listed", lambda: "from-file" in names(service), timeout_s=15)
    for pin in (True, False):  # a file's model is changed through the API too, as often as wanted
        patched = service.http.patch("/v1/admin/models/from-file", json={"pin": pin})
        assert patched.status_code == 200 and patched.json()["entry"] == {"pin": pin}, patched.text
    put = service.http.put(
        "/v1/admin/models/from-api",
        json={"path": str(model_dir), "aliases": ["gpt-x"], "defaults": {"max_tokens": 5}},
    )
    assert put.status_code == 200, put.text
    wait_until("the API's model is listed", lambda: "from-api" in names(service), timeout_s=15)
    # its alias answers, and a request without max_tokens gets the model's default
    job = service.submit(model="gpt-x", prompt="x", ignore_eos=True)
    result = service.wait_for(job["id"], ["finished", "failed"], 60)
    assert result["status"] == "finished", result
    assert result["result"]["usage"]["completion_tokens"] == 5
    bad = service.http.put("/v1/admin/models/bad", json={"path": str(model_dir), "defaults": {"temperature": 9}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "defaults", bad.text
    # removing a file's model through the API takes away only what the API laid over it (the pin)...
    undone = service.http.delete("/v1/admin/models/from-file")
    assert undone.status_code == 200 and undone.json()["still_in_models_file"] is True, undone.text
    assert "from-file" in names(service)
    # ...and the file's model itself is edited in the file
    refused = service.http.delete("/v1/admin/models/from-file")
    assert refused.status_code == 409 and "models file" in refused.json()["error"]["message"]
    removed = service.http.delete("/v1/admin/models/from-api")
    assert removed.status_code == 200, removed.text
    wait_until("the API's model is gone", lambda: "from-api" not in names(service), timeout_s=15)
    models_file.write_text("# empty again\n")
    wait_until("the file's model is gone", lambda: "from-file" not in names(service), timeout_s=15)


def names(service: Service) -> list[str]:
    return [m["id"] for m in service.http.get("/v1/models").json()["data"]]


def loaded(service: Service) -> dict[str, dict[str, Any]]:
    workers = service.http.get("/v1/admin/status").json()["workers"]
    return {m["name"]: m for w in workers for m in w.get("models") or [] if m.get("state") == "loaded"}


def test_a_warm_model_is_loaded_before_its_first_request(stack: tuple[Service, Path, Path], model_dir: Path) -> None:
    service, _, _ = stack
    assert "warmed" not in loaded(service)
    put = service.http.put("/v1/admin/models/warmed", json={"path": str(model_dir), "warm": True})
    assert put.status_code == 200, put.text
    wait_until("the warm model is loaded", lambda: "warmed" in loaded(service), timeout_s=30)


def test_ollama_copy_delete_and_keep_alive(stack: tuple[Service, Path, Path], model_dir: Path) -> None:
    service, _, _ = stack
    client = ollama.Client(host=service.base_url)
    service.http.put("/v1/admin/models/original", json={"path": str(model_dir)})
    wait_until("listed", lambda: "original" in names(service), timeout_s=15)
    client.copy("original", "copied")
    wait_until("the copy is listed", lambda: "copied" in names(service), timeout_s=15)
    client.generate(model="copied", prompt="x", options={"num_predict": 2}, keep_alive="1h")
    ps = {m.model: m for m in client.ps().models}
    assert "copied" in ps and ps["copied"].expires_at is not None
    assert 3000 < ps["copied"].expires_at.timestamp() - time.time() <= 3600, ps["copied"].expires_at
    # keep_alive 0: unloaded as soon as it is idle
    client.generate(model="copied", prompt="x", options={"num_predict": 2}, keep_alive=0)
    wait_until("unloaded once idle", lambda: "copied" not in loaded(service), timeout_s=20)
    with pytest.raises(ollama.ResponseError) as refused:  # beyond any sane time: refused, not a broken /api/ps
        client.generate(model="copied", prompt="x", options={"num_predict": 2}, keep_alive=1e12)
    assert 400 <= refused.value.status_code < 500
    client.delete("copied")
    wait_until("the copy is gone", lambda: "copied" not in names(service), timeout_s=15)
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete("copied")
    assert caught.value.status_code == 404


def run_mlxq(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLXQ_URL": service.base_url, "COLUMNS": "200"}
    return subprocess.run([MLXQ, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_mlxq_command_pulls_pins_lists_and_watches(stack: tuple[Service, Path, Path]) -> None:
    service, _, _ = stack
    pulled = run_mlxq(service, "pull", "team/cli", "--name", "cli-model", "--pin")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "pulled team/cli as model 'cli-model'" in pulled.stdout
    listed = run_mlxq(service, "models")
    assert listed.returncode == 0 and "cli-model" in listed.stdout and "team/cli" in listed.stdout, listed.stdout
    assert run_mlxq(service, "load", "cli-model").returncode == 0
    wait_until("loaded by `mlxq load`", lambda: "cli-model" in loaded(service), timeout_s=30)
    ps = run_mlxq(service, "ps")
    assert ps.returncode == 0 and "cli-model" in ps.stdout and "yes" in ps.stdout, ps.stdout
    assert "kept" in ps.stdout and "prompt tokens read from kept caches" in ps.stdout, ps.stdout
    unpinned = run_mlxq(service, "pin", "cli-model", "--off")
    assert unpinned.returncode == 0 and "unpinned" in unpinned.stdout
    jobs = run_mlxq(service, "jobs")
    assert jobs.returncode == 0, jobs.stderr
    top = run_mlxq(service, "top", "--once", "--interval", "0.5")
    assert top.returncode == 0, top.stderr
    for label in ("queued", "batch", "tokens/s", "memory", "warning", "read from kept caches"):
        assert label in top.stdout, top.stdout
    # an error is the API's message, and no traceback
    missing = run_mlxq(service, "rm", "no-such-model")
    assert missing.returncode == 1 and "no-such-model" in missing.stdout and "Traceback" not in missing.stderr
    away = subprocess.run(
        [MLXQ, "models"],
        env={**os.environ, "MLXQ_URL": f"http://127.0.0.1:{free_port()}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert away.returncode == 1 and "cannot reach mlxq" in away.stdout and "Traceback" not in away.stderr
    removed = run_mlxq(service, "rm", "cli-model")
    assert removed.returncode == 0 and "removed model 'cli-model'" in removed.stdout


def test_a_pinned_model_survives_the_pressure_that_evicts_others(
    redis_server: Any, model_dir: Path, tmp_path: Path
) -> None:
    copies = {}
    for name in ("kept", "first", "second"):
        copies[name] = tmp_path / name
        shutil.copytree(model_dir, copies[name])
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        f'[models.kept]\npath = "{copies["kept"]}"\npin = true\n'
        f'[models.first]\npath = "{copies["first"]}"\n[models.second]\npath = "{copies["second"]}"\n'
    )
    # room for two of these models, not three
    budget = int(2.5 * (model_dir / "model.safetensors").stat().st_size)
    service = Service(
        redis_server.url.rsplit("/", 1)[0] + "/10",
        tmp_path / "data",
        tmp_path,
        models_file=models_file,
        model_budget_bytes=budget,
        prefix_cache_fraction=0.0,
        heartbeat_interval_s=0.5,
    )
    try:
        for name in ("kept", "first", "second"):
            job = service.submit(model=name, prompt="x", max_tokens=2)
            assert service.wait_for(job["id"], ["finished", "failed"], 60)["status"] == "finished"
        held = wait_until("two models held", lambda: len(m := loaded(service)) == 2 and m)
        assert set(held) == {"kept", "second"} and held["kept"]["pinned"] is True, held
        assert held["kept"]["expires_at"] is None
    finally:
        service.stop()
