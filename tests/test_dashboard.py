"""rq-dashboard, started as scripts/dashboard starts it, against mlxq in every state its jobs and
workers can be in: a busy worker holding several jobs, a batch whose synthesis waits on its
children, canceled (queued and running), failed and finished jobs, in all three queues."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Process, Service, service_env
from tests.support.redis_servers import RedisServer, free_port

pytestmark = pytest.mark.slow

QUEUES = ("mlxq-interactive", "mlxq-jobs", "mlxq-batch")
REGISTRIES = ("queued", "started", "finished", "failed", "deferred", "scheduled", "canceled")
LONG = {"max_tokens": 30_000, "ignore_eos": True}
MARKER = "zebra-quartz-prompt"
"""In the prompts of the scene's running jobs: no dashboard page may show it."""


class Scene:
    """The service with work in every state, and the dashboard pointed at it."""

    def __init__(self, svc: Service, base: str, jobs: dict[str, str], batch_id: str, synthesis_id: str) -> None:
        self.svc, self.base, self.jobs, self.batch_id, self.synthesis_id = svc, base, jobs, batch_id, synthesis_id

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10)


def wait_answering(base: str, dashboard: Process) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "/0/data/queues.json", timeout=2)
            return
        except httpx.TransportError:
            assert dashboard.alive() and time.monotonic() < deadline, dashboard.tail()
            time.sleep(0.2)


@pytest.fixture(scope="module")
def scene(redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    root = tmp_path_factory.mktemp("dashboard")
    models_file = root / "models.toml"
    models_file.write_text(f'[models.missing]\npath = "{root / "missing"}"\n')
    (root / "missing").mkdir()
    (root / "missing" / "config.json").write_text('{"model_type": "qwen2"}')  # no weights: its load fails
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    svc = Service(
        url, data_dir, root, models_file=models_file, max_batch=4, heartbeat_interval_s=0.3, max_tokens_cap=30_000
    )
    jobs: dict[str, str] = {}
    jobs["finished"] = svc.wait_for(svc.submit(model="tiny", prompt="Hi", max_tokens=3)["id"], {"finished"})["id"]
    jobs["failed"] = svc.wait_for(svc.submit(model="missing", prompt="Hi")["id"], {"failed"})["id"]
    jobs["canceled_running"] = svc.submit(model="tiny", prompt="Hi", **LONG)["id"]
    svc.wait_for(jobs["canceled_running"], {"started"})
    assert svc.http.delete(f"/v1/jobs/{jobs['canceled_running']}").status_code in (200, 202)
    svc.wait_for(jobs["canceled_running"], {"canceled"})
    # An interactive job: a streamed OpenAI call, held open (a hang-up would cancel it).
    stream_client = httpx.Client(base_url=svc.base_url, timeout=60)
    stream = stream_client.stream(
        "POST", "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": MARKER}],
                                             "stream": True, **LONG}
    )  # fmt: skip
    jobs["interactive"] = stream.__enter__().headers["x-mlxq-job-id"]
    batch = svc.http.post(
        "/v1/batches",
        json={
            "model": "tiny",
            "requests": [
                {"custom_id": f"part-{i}", "messages": [{"role": "user", "content": MARKER}], **LONG} for i in range(3)
            ],
            "synthesis": {"messages": [{"role": "user", "content": MARKER + " {{results}}"}], "max_tokens": 4},
        },
    )
    assert batch.status_code == 202, batch.text
    created = batch.json()
    children = [child["id"] for child in created["requests"]]
    jobs.update({f"child{i}": child for i, child in enumerate(children)})
    # The worker holds four jobs (its batch is full); more wait in the queue, one is canceled there.
    jobs["queued"] = svc.submit(model="tiny", prompt="Hi", priority="low", **LONG)["id"]
    jobs["canceled_queued"] = svc.submit(model="tiny", prompt="Hi", priority="low", **LONG)["id"]
    assert svc.http.delete(f"/v1/jobs/{jobs['canceled_queued']}").status_code in (200, 202)
    for job_id in (jobs["interactive"], *children):
        svc.wait_for(job_id, {"started"})

    port = free_port()
    # No credential here, explicitly, for the browser below (test_a_credential_is_asked_by_default).
    env = {**service_env(url, data_dir), "MLXQ_DASHBOARD_PORT": str(port), "MLXQ_DASHBOARD_AUTH": "false"}
    dashboard = Process("scripts/dashboard", env, root / "dashboard.log", ["bash", "scripts/dashboard"])
    base = f"http://127.0.0.1:{port}"
    wait_answering(base, dashboard)
    yield Scene(svc, base, jobs, created["id"], created["synthesis"]["id"])
    dashboard.stop()
    stream.__exit__(None, None, None)
    stream_client.close()
    svc.stop()


def test_every_dashboard_endpoint_answers_while_a_batch_runs(scene: Scene) -> None:
    queues = scene.get("/0/data/queues.json")
    assert queues.status_code == 200
    assert set(QUEUES) <= {q["name"] for q in queues.json()["queues"]}

    workers = scene.get("/0/data/workers.json")
    assert workers.status_code == 200, workers.text
    [worker] = workers.json()["workers"]
    assert worker["state"] == "busy"
    running = {scene.jobs["interactive"], *(scene.jobs[f"child{i}"] for i in range(3))}
    assert worker["current_job"]["job_id"] in running

    listed: dict[str, set[str]] = {}
    for queue in QUEUES:
        for registry in REGISTRIES:
            page = scene.get(f"/0/data/jobs/{queue}/{registry}/100/asc/1.json")
            assert page.status_code == 200, (queue, registry, page.text)
            listed.setdefault(registry, set()).update(job["id"] for job in page.json()["jobs"])
    assert scene.jobs["finished"] in listed["finished"]
    assert scene.jobs["failed"] in listed["failed"]
    assert running <= listed["started"]
    assert scene.jobs["queued"] in listed["queued"]
    assert scene.synthesis_id in listed["deferred"]
    for job_id in (*scene.jobs.values(), scene.synthesis_id):
        page = scene.get(f"/0/data/job/{job_id}.json")
        assert page.status_code == 200, (job_id, page.text)


def test_batch_children_and_the_synthesis_name_their_batch(scene: Scene) -> None:
    child = scene.get(f"/0/data/job/{scene.jobs['child1']}.json").json()
    assert child["description"] == f"generate model=tiny priority=low batch={scene.batch_id} custom_id=part-1"
    assert scene.batch_id in child["metadata"]
    synthesis = scene.get(f"/0/data/job/{scene.synthesis_id}.json").json()
    assert synthesis["description"].startswith(f"synthesize batch={scene.batch_id}")
    assert scene.batch_id in synthesis["metadata"]


def test_a_canceled_job_is_canceled_not_failed_and_counted_so(scene: Scene) -> None:
    canceled: set[str] = set()
    failed: set[str] = set()
    for queue in QUEUES:
        canceled |= {j["id"] for j in scene.get(f"/0/data/jobs/{queue}/canceled/100/asc/1.json").json()["jobs"]}
        failed |= {j["id"] for j in scene.get(f"/0/data/jobs/{queue}/failed/100/asc/1.json").json()["jobs"]}
    for key in ("canceled_running", "canceled_queued"):
        assert scene.jobs[key] in canceled and scene.jobs[key] not in failed
        assert scene.get(f"/0/data/job/{scene.jobs[key]}.json").json()["status"] == "canceled"
    metrics = scene.svc.http.get("/metrics").text
    assert 'mlxq_jobs_total{status="canceled"} 2.0' in metrics
    log = scene.svc.worker.tail(200_000)
    canceled_lines = [line for line in log.splitlines() if scene.jobs["canceled_running"] in line]
    assert any("job canceled" in line and "INFO" in line for line in canceled_lines), canceled_lines
    assert "GenerationCanceled" not in log  # no traceback for a cancel


def test_health_lists_the_running_jobs_of_a_busy_worker(scene: Scene) -> None:
    [worker] = scene.svc.http.get("/health").json()["workers"]
    running = {scene.jobs["interactive"], *(scene.jobs[f"child{i}"] for i in range(3))}
    assert worker["state"] == "busy" and set(worker["jobs"]) == running


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    pytest.skip("headless Chromium is not installed (scripts/test installs Debian's `chromium` where apt can)")


def rendered(browser: str, url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran (rq-dashboard fills its tables from the JSON endpoints)."""
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=8000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_a_real_browser_shows_our_queues_the_busy_worker_and_the_synthesis_batch(scene: Scene, tmp_path: Path) -> None:
    browser = chromium()
    queues = rendered(browser, scene.base + "/0/view/queues", tmp_path)
    assert all(name in queues for name in QUEUES), queues[-3000:]
    workers = rendered(browser, scene.base + "/0/view/workers", tmp_path)
    running = [scene.jobs["interactive"], *(scene.jobs[f"child{i}"] for i in range(3))]
    assert "busy" in workers and any(job_id in workers for job_id in running), workers[-3000:]
    job_page = rendered(browser, f"{scene.base}/0/view/job/{scene.synthesis_id}", tmp_path)
    assert scene.batch_id in job_page, job_page[-3000:]


def test_no_dashboard_page_shows_prompt_text(scene: Scene) -> None:
    pages = [scene.get("/0/data/workers.json").text]
    for job_id in (*scene.jobs.values(), scene.synthesis_id):
        pages.append(scene.get(f"/0/data/job/{job_id}.json").text)
    for queue in QUEUES:
        for registry in REGISTRIES:
            pages.append(scene.get(f"/0/data/jobs/{queue}/{registry}/100/asc/1.json").text)
    assert "generate(arguments hidden" in pages[0]  # the running job's call, without its prompt
    assert not [page for page in pages if MARKER in page]


def test_state_changes_come_only_from_the_dashboards_own_pages(scene: Scene) -> None:
    job_id = scene.svc.submit(model="tiny", prompt="Hi", priority="low", **LONG)["id"]
    # Another site's form (no Origin, or its own) may not delete it, nor a link requeue everything.
    for headers in ({}, {"Origin": "http://evil.example"}):
        refused = httpx.post(f"{scene.base}/job/{job_id}/delete", headers=headers, timeout=10)
        assert refused.status_code == 403, refused.text
    assert scene.svc.job(job_id)["status"] == "queued"
    assert httpx.get(f"{scene.base}/requeue/mlxq-jobs", timeout=10).status_code == 405
    done = httpx.post(f"{scene.base}/job/{job_id}/delete", headers={"Origin": scene.base}, timeout=10)
    assert done.status_code == 200, done.text
    assert scene.svc.http.get(f"/v1/jobs/{job_id}").status_code == 404


def test_a_credential_is_asked_by_default_and_printed_once(scene: Scene, tmp_path: Path) -> None:
    port = free_port()
    url = scene.svc.env["MLXQ_REDIS_URL"]
    env = {**service_env(url, tmp_path / "data"), "MLXQ_DASHBOARD_PORT": str(port)}
    dashboard = Process("scripts/dashboard", env, tmp_path / "dashboard.log", ["bash", "scripts/dashboard"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_answering(base, dashboard)
        assert httpx.get(base + "/0/data/queues.json", timeout=10).status_code == 401
        kept = tmp_path / "data" / "dashboard-password"
        assert kept.stat().st_mode & 0o077 == 0
        password = kept.read_text().strip()
        assert password in (tmp_path / "dashboard.log").read_text()
        allowed = httpx.get(base + "/0/data/queues.json", auth=("mlxq", password), timeout=10)
        assert allowed.status_code == 200
    finally:
        dashboard.stop()
