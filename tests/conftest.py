from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from tests.scripted_model import (
    CALLER,
    CODER,
    CODER_TEMPLATE,
    GEMMA4_CALL,
    GEMMA4_SPECIAL,
    GEMMA4_TEMPLATE,
    HARMONY_ANSWER,
    HARMONY_CALL,
    HARMONY_SPECIAL,
    HARMONY_TEMPLATE,
    SPECIAL,
    THINKER,
    build_scripted_model,
)
from tests.support.processes import Service
from tests.support.redis_servers import PersistentRedis, RedisServer

# Engines built in this process (Settings() reads MLXQ_*) keep no prefixes on disk: the default directory is
# the user's own. The disk tier's tests give it a directory and a budget of their own.
os.environ["MLXQ_PREFIX_DISK_BYTES"] = "0"

MISSING_MODEL_PATH = "/nonexistent/mlxq-test-model"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def scratch_redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A database of the session's server that no long-lived process uses, emptied for each test."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    client = Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    """A redis-server with AOF (fsync always) of the test's own, to kill and start again."""
    (tmp_path / "redis").mkdir()
    server = PersistentRedis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every process in the session, so the demo model is built once."""
    return tmp_path_factory.mktemp("data")


NARROW_CONTEXT = 256
"""The context of the `narrow` model: a prompt overflows it at a few hundred words."""


@pytest.fixture(scope="session")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    broken = directory / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2"}')  # and no weights
    thinker = build_scripted_model(directory / "thinker", THINKER)
    caller = build_scripted_model(directory / "caller", CALLER)
    coder = build_scripted_model(directory / "coder", CODER, CODER_TEMPLATE)
    harmony = {"chat_template": HARMONY_TEMPLATE, "special": HARMONY_SPECIAL, "prompt_end": "<|start|>assistant"}
    oss = build_scripted_model(directory / "oss", HARMONY_ANSWER, **harmony)  # type: ignore[arg-type]
    gemma = build_scripted_model(
        directory / "gemma-caller", GEMMA4_CALL, GEMMA4_TEMPLATE, GEMMA4_SPECIAL, "<start_of_turn>model\n"
    )
    oss_caller = build_scripted_model(directory / "oss-caller", HARMONY_CALL, **harmony)  # type: ignore[arg-type]
    special = build_scripted_model(directory / "special", SPECIAL, special=("<|fim_pad|>",))
    path = directory / "models.toml"
    path.write_text(
        f'[models.missing]\npath = "{MISSING_MODEL_PATH}"\nnotes = "its directory does not exist"\n'
        f'[models.broken]\npath = "{broken}"\nnotes = "a config.json and no weights"\n'
        f'[models.thinker]\npath = "{thinker}"\nnotes = "scripted: thinks, then answers"\n'
        f'[models.caller]\npath = "{caller}"\nnotes = "scripted: calls get_weather"\n'
        f'[models.coder]\npath = "{coder}"\nnotes = "scripted: calls get_weather in Qwen3-Coder XML"\n'
        f'[models.gemma-caller]\npath = "{gemma}"\nnotes = "scripted: Gemma 4 thought channel, then a call"\n'
        f'[models.oss]\npath = "{oss}"\nnotes = "scripted: gpt-oss channels, reasons then answers"\n'
        f'[models.oss-caller]\npath = "{oss_caller}"\nnotes = "scripted: gpt-oss channels, calls get_weather"\n'
        f'[models.thinker-raw]\npath = "{thinker}"\nreasoning = false\nnotes = "the thinker, unsplit"\n'
        f'[models.special]\npath = "{special}"\nnotes = "scripted: a special token mid-answer"\n'
        f'[models.narrow]\npath = "{thinker}"\ncontext_tokens = {NARROW_CONTEXT}\nnotes = "short context"\n'
    )
    return path


@pytest.fixture(scope="session")
def service(
    redis_server: RedisServer, data_dir: Path, models_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One gateway and one worker for the tests that only need a running service."""
    svc = Service(
        redis_server.url,
        data_dir,
        tmp_path_factory.mktemp("logs"),
        models_file=models_file,
        max_tokens_cap=100_000,
        heartbeat_interval_s=0.5,
        # Admission has tests of its own; here it must not get in the way.
        rate_limit_requests=100_000,
        max_inflight_per_client=10_000,
        max_queued=10_000,
        # One job at a time, so that a job started first holds the ones behind it in the queue
        # (tests of queue order, positions, cancels of queued jobs); batching has tests of its own.
        max_batch=1,
    )
    yield svc
    svc.stop()
