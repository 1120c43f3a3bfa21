"""Every protocol waits for a job the same way (gateway/streams/waiting.py): past MLXQ_OPENAI_WAIT_S a call is a
504 naming its job, in that protocol's error shape; the job goes on. Real gateway, worker and Redis,
official clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from redis import Redis

from shared import keys
from tests.support.processes import Gateway, Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

WAIT_S = 2


@pytest.fixture(scope="module")
def impatient(
    service: Service,
    redis_server: RedisServer,
    data_dir: Path,
    models_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """A second gateway on the session service's Redis (and so its one-slot worker) that waits 2 s."""
    gateway = Gateway(
        redis_server.url,
        data_dir,
        tmp_path_factory.mktemp("impatient") / "gateway.log",
        models_file=models_file,
        max_tokens_cap=100_000,
        openai_wait_s=WAIT_S,
        rate_limit_requests=100_000,
        max_inflight_per_client=10_000,
        max_queued=10_000,
    )
    yield gateway
    gateway.stop()


@pytest.fixture
def busy(service: Service) -> Iterator[str]:
    """The worker's one batch slot held by a long job, so that a call's job waits in the queue."""
    blocker = service.submit(model="tiny", prompt="Keep going", max_tokens=30_000, ignore_eos=True)["id"]
    service.wait_for(blocker, {"started"})
    yield blocker
    service.http.delete(f"/v1/jobs/{blocker}")


def forget(service: Service, job_id: str) -> None:
    assert service.job(job_id)["status"] in ("queued", "started")  # it went on
    service.http.delete(f"/v1/jobs/{job_id}")


def test_anthropic_messages_past_the_wait_is_a_504_with_the_job_id(
    impatient: Gateway, busy: str, service: Service
) -> None:
    client = anthropic.Anthropic(base_url=impatient.base_url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 504
    job_id = caught.value.response.headers["x-mlxq-job-id"]
    body = caught.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "timeout_error"
    assert job_id in body["error"]["message"]
    forget(service, job_id)


def test_ollama_chat_past_the_wait_is_a_504_with_the_job_id(impatient: Gateway, busy: str, service: Service) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=impatient.base_url).chat(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], stream=False, options={"num_predict": 4}
        )
    assert caught.value.status_code == 504
    raw = httpx.post(
        impatient.base_url + "/api/generate",
        json={"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": 4}},
        timeout=30,
    )
    assert raw.status_code == 504
    job_id = raw.headers["x-mlxq-job-id"]
    assert list(raw.json()) == ["error"] and job_id in raw.json()["error"]
    assert "/v1/jobs/" in caught.value.error
    forget(service, job_id)
    forget(service, caught.value.error.split("/v1/jobs/")[1].split()[0])


def test_openai_chat_past_the_wait_is_one_504_with_the_job_id_despite_the_sdks_retries(
    impatient: Gateway, busy: str, service: Service, redis: Redis
) -> None:
    client = openai.OpenAI(base_url=impatient.base_url + "/v1", api_key="unused")  # default: 2 retries
    before = int(redis.get(keys.ADMITTED) or 0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 504
    assert caught.value.response.headers["x-should-retry"] == "false"
    job_id = caught.value.response.headers["x-mlxq-job-id"]
    assert caught.value.response.json()["error"]["code"] == "timeout" and job_id in caught.value.message
    assert int(redis.get(keys.ADMITTED) or 0) == before + 1  # the SDK did not retry it into more jobs
    forget(service, job_id)
