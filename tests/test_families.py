"""Today's model families through the whole service: a real gateway, worker and redis-server, and
tiny random-weight models of mlx-lm's own classes (worker/tiny_families.py) with every kind of
cache: plain KV, sliding windows beside full attention, gated delta nets and Mamba layers beside
attention, latent attention and experts. Each answers alone and streamed, batched as alone, and
resumes each turn of a chat from the last (OpenAI's Python SDK, unmodified)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.processes import Service
from tests.support.redis_servers import RedisServer
from worker.tiny_families import FAMILIES, build_family_model

pytestmark = pytest.mark.slow

MATRIX = ["llama", "qwen3", "qwen3_moe", "deepseek_v3", "gemma3_text", "gpt_oss", "qwen3_next", "qwen3_5", "nemotron_h"]
assert set(MATRIX) == set(FAMILIES)

SYSTEM = (
    "You are the assistant of a team that runs large local models for its staff and for an agent system. "
    "Answer briefly, name the files you touch, and never invent a tool's output. "
) * 6
"""About 400 tokens of the demo tokenizer: long enough that each sliding window has wrapped."""


@pytest.fixture(scope="module")
def families(
    redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, OpenAI]]:
    root = tmp_path_factory.mktemp("families")
    models = root / "models.toml"
    models.write_text(
        "".join(f'[models.{family}]\npath = "{build_family_model(root / family, family)}"\n' for family in MATRIX)
    )
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/12",
        data_dir,
        tmp_path_factory.mktemp("families-logs"),
        models_file=models,
        max_batch=8,
        heartbeat_interval_s=0.5,
        rate_limit_requests=100_000,
        max_inflight_per_client=1_000,
    )
    yield svc, OpenAI(base_url=svc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    svc.stop()


def chat(client: OpenAI, family: str, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return client.chat.completions.create(
        model=family,
        messages=messages,
        max_tokens=12,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("family", MATRIX)
def test_each_family_answers_alone_streamed_and_batched_as_alone(families: tuple[Service, OpenAI], family: str) -> None:
    svc, client = families
    lines = [f"Write {n} short lines about the sea, line {n}. " * n for n in (1, 3, 9, 2)]
    asked = [[{"role": "user", "content": line}] for line in lines]
    alone = [chat(client, family, messages, logprobs=True) for messages in asked]
    assert all(answer.usage.completion_tokens > 0 for answer in alone)

    streamed = client.chat.completions.create(
        model=family,
        messages=asked[0],
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == (
        alone[0].choices[0].message.content
    )

    with concurrent.futures.ThreadPoolExecutor(len(asked)) as pool:
        together = list(pool.map(lambda messages: chat(client, family, messages, logprobs=True), asked))
    for one, batched in zip(alone, together, strict=True):
        assert batched.choices[0].message.content == one.choices[0].message.content
        solo = [entry.logprob for entry in one.choices[0].logprobs.content]
        beside = [entry.logprob for entry in batched.choices[0].logprobs.content]
        assert beside == pytest.approx(solo, abs=1e-3)
    assert svc.worker.alive()


@pytest.mark.parametrize("family", MATRIX)
def test_each_turn_of_a_chat_resumes_from_the_last(families: tuple[Service, OpenAI], family: str) -> None:
    svc, client = families
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM + family}]
    previous_prompt = 0
    for turn in range(4):
        messages.append({"role": "user", "content": f"Turn {turn}: which file holds the settings?"})
        answer = chat(client, family, messages)
        usage = answer.usage
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        if turn == 0:
            assert usage.prompt_tokens > 300
        else:
            assert cached >= 0.9 * previous_prompt, (turn, cached, previous_prompt)
        previous_prompt = usage.prompt_tokens
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    assert svc.worker.alive()
