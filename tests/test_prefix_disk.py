"""The disk tier of kept prefixes (worker/prefix_disk.py), on tiny models of mlx-lm's own classes: a prefix
kept by one process is read back by the next and continues exactly as a cold prefill; a truncated,
corrupt or foreign file is a miss, never a wrong state; the tier stays within its budget; a disk that
refuses writes turns writing off and fails nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from openai import OpenAI
from redis import Redis

from shared import keys
from shared.prefix_blocks import BLOCK_TOKENS, routes
from shared.settings import Settings
from tests.support.processes import Gateway, Process, Service
from tests.support.redis_servers import RedisServer
from worker import cache_shape, model_files
from worker.demo_model import build_builtin
from worker.kv_manager import KVCacheManager
from worker.prefix_disk import PrefixDisk
from worker.tiny_families import build_family_model

PROMPT = [(i * 7) % 400 + 20 for i in range(600)]
"""Whole blocks and a tail, in the demo tokenizer's vocabulary."""
NEXT = [*PROMPT, 31, 32, 33]


class Tiny:
    def __init__(self, root: Path, family: str, name: str | None = None, **overrides: Any) -> None:
        self.path = build_family_model(root / (name or family), family, **overrides)
        self.model = load(str(self.path))[0]
        self.identity = model_files.identity(self.path)
        self.cuttable = cache_shape.cuttable(make_prompt_cache(self.model))

    def manager(self, root: Path, budget: int = 10**9) -> KVCacheManager:
        """A KV cache manager as a worker process starts with: memory empty, the disk as it is."""
        kv = KVCacheManager(10**9, PrefixDisk(root, budget))
        kv.serving("m", self.model, self.identity, self.cuttable)
        return kv

    def prefill(self, ids: list[int], cache: list[Any] | None = None) -> tuple[list[Any], mx.array]:
        cache = cache if cache is not None else make_prompt_cache(self.model)
        logits = self.model(mx.array([ids]), cache=cache)[:, -1, :]
        mx.eval(logits)
        return cache, logits

    def keep(self, kv: KVCacheManager, ids: list[int]) -> None:
        cache, _ = self.prefill(ids)
        assert kv.keep_copy("m", ids, cache, len(ids))
        assert kv.disk is not None
        kv.disk.flush()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("disk-models")
    tiny = {family: Tiny(root, family) for family in ("llama", "gemma3_text", "qwen3_next")}
    # Blocks of 128 KiB: the disk-refusal test's file limit (64 KiB) is below them and above the worker's log.
    return {**tiny, "wide": Tiny(root, "llama", "wide", num_hidden_layers=8)}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_next"])
def test_a_prefix_kept_by_one_process_continues_in_the_next_as_a_cold_prefill(
    models: dict[str, Tiny], tmp_path: Path, family: str
) -> None:
    tiny = models[family]
    tiny.keep(tiny.manager(tmp_path), PROMPT)
    assert list((tmp_path / tiny.identity).iterdir()), "nothing was written"
    for path in [tmp_path, *tmp_path.iterdir(), *(tmp_path / tiny.identity).iterdir()]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"

    restarted = tiny.manager(tmp_path)
    seeded, reused = restarted.seed("m", NEXT)
    # Exactly the kept tokens: blocks and a tail where the cache can be cut, the state where it cannot.
    assert reused == len(PROMPT)
    assert restarted.hits.disk == 1 and restarted.hits.disk_tokens == reused
    assert seeded is not None
    _, resumed = tiny.prefill(NEXT[reused:], seeded)
    _, cold = tiny.prefill(NEXT)
    assert mx.allclose(resumed, cold, atol=1e-4).item()

    # Now in memory too: the next lookup does not read the disk again.
    restarted.seed("m", NEXT)
    assert restarted.hits.disk == 1 and restarted.hits.memory == 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_next"])
def test_a_process_started_again_reads_its_recent_prompts_back_into_memory_before_it_is_asked(
    models: dict[str, Tiny], tmp_path: Path, family: str
) -> None:
    tiny = models[family]
    kv = tiny.manager(tmp_path)
    tiny.keep(kv, PROMPT)
    shorter = PROMPT[
        : 5 * BLOCK_TOKENS + 20
    ]  # an earlier turn's prompt, where the cache can be cut: the longer serves it
    cache, _ = tiny.prefill(shorter)
    kv.keep_copy("m", shorter, cache, len(shorter))
    assert kv.disk is not None
    kv.disk.flush()
    restarted = tiny.manager(tmp_path)
    recent = restarted.recent_prompts("m", 8)
    assert recent == ([PROMPT] if tiny.cuttable else [shorter, PROMPT]), [len(p) for p in recent]
    assert restarted.room_to_read_ahead and restarted.read_ahead("m", PROMPT)
    assert restarted.hits.read_ahead == 1
    seeded, reused = restarted.seed("m", NEXT)
    assert reused == len(PROMPT) and seeded is not None
    assert (restarted.hits.memory, restarted.hits.disk) == (1, 0)  # the request found it in memory
    _, resumed = tiny.prefill(NEXT[reused:], seeded)
    _, cold = tiny.prefill(NEXT)
    assert mx.allclose(resumed, cold, atol=1e-4).item()


def test_a_finished_turn_resumes_after_a_restart_at_its_prompts_end_when_the_client_rewrote_the_answer(
    models: dict[str, Tiny], tmp_path: Path
) -> None:
    """An agent keeps its own record of each answer: its next turn goes on from the last prompt's end, not from
    what was generated. From disk, as from memory, that end is resumed exactly, not the block before it."""
    tiny = models["llama"]
    kv = tiny.manager(tmp_path)
    generated = [41, 42, 43, 44, 45, 46, 47, 48]
    cache, _ = tiny.prefill(PROMPT + generated)
    kv.finished("m", PROMPT + generated, cache, "job", prompt=len(PROMPT))
    assert kv.disk is not None
    kv.disk.flush()
    rewritten = [*PROMPT, 51, 52, 53, 54]
    seeded, reused = tiny.manager(tmp_path).seed("m", rewritten)
    assert reused == len(PROMPT) > len(PROMPT) // BLOCK_TOKENS * BLOCK_TOKENS
    assert seeded is not None
    _, resumed = tiny.prefill(rewritten[reused:], seeded)
    _, cold = tiny.prefill(rewritten)
    assert mx.allclose(resumed, cold, atol=1e-4).item()


def test_long_prompts_kept_together_are_written_whole(models: dict[str, Tiny], tmp_path: Path) -> None:
    """Every block is a file: two 4,500-token starts kept at once (here one start under two models' names)
    leave 140 of them, none dropped for the writer being behind."""
    tiny = models["llama"]
    kv = tiny.manager(tmp_path)
    kv.serving("copy", tiny.model, "f" * 32, tiny.cuttable)
    ids = [(i * 7) % 400 + 20 for i in range(70 * BLOCK_TOKENS)]
    cache, _ = tiny.prefill(ids)
    assert kv.keep_copy("m", ids, cache, len(ids)) and kv.keep_copy("copy", ids, cache, len(ids))
    assert kv.disk is not None
    kv.disk.flush()
    assert kv.disk.stats.dropped_writes == 0
    assert len(list((tmp_path / tiny.identity).iterdir())) == len(list((tmp_path / ("f" * 32)).iterdir())) == 70
    assert tiny.manager(tmp_path).seed("m", [*ids, 7])[1] == len(ids)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_next"])
def test_a_process_started_again_publishes_the_routing_names_of_what_its_disk_holds(
    models: dict[str, Tiny], tmp_path: Path, family: str
) -> None:
    """Before any file is read: the claim script sends a session's next turn to the worker whose disk holds its
    start (blocks name theirs in their file names, a whole state in its header)."""
    tiny = models[family]
    tiny.keep(tiny.manager(tmp_path), PROMPT)
    assert set(tiny.manager(tmp_path).routes.take_new()) == set(routes("m", PROMPT))
    assert len(routes("m", PROMPT)) == len(PROMPT) // BLOCK_TOKENS


def test_a_prompt_shorter_than_a_block_is_not_written(models: dict[str, Tiny], tmp_path: Path) -> None:
    """It recomputes faster than a file is written and read back: a short chat's turn costs no disk write."""
    tiny = models["llama"]
    kv = tiny.manager(tmp_path)
    tiny.keep(kv, PROMPT[: BLOCK_TOKENS - 1])
    assert not (tmp_path / tiny.identity).exists() or not list((tmp_path / tiny.identity).iterdir())
    tiny.keep(kv, PROMPT[: BLOCK_TOKENS + 20])
    assert len(list((tmp_path / tiny.identity).iterdir())) == 2  # one block and its tail


def test_a_truncated_corrupt_or_foreign_file_is_a_miss_and_is_removed(models: dict[str, Tiny], tmp_path: Path) -> None:
    tiny = models["llama"]
    tiny.keep(tiny.manager(tmp_path), PROMPT)
    directory = tmp_path / tiny.identity
    assert len(list(directory.iterdir())) == len(PROMPT) // BLOCK_TOKENS + 1  # the blocks and the tail after them
    kv = tiny.manager(tmp_path)
    found = kv.disk.find(tiny.identity, NEXT, True, 0) if kv.disk else None
    assert found is not None
    first, second = (directory / f"{key}." for key in found.keys[:2])

    def file_of(prefix: Path) -> Path:
        [path] = [p for p in directory.iterdir() if p.name.startswith(prefix.name)]
        return path

    # The second block cut short: the first still serves.
    truncated = file_of(second)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    kv = tiny.manager(tmp_path)
    assert kv.seed("m", NEXT)[1] == BLOCK_TOKENS
    assert not truncated.exists()

    # One byte of the first changed: nothing is served, nothing wrong.
    corrupt = file_of(first)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x40
    corrupt.write_bytes(bytes(data))
    kv = tiny.manager(tmp_path)
    assert kv.seed("m", NEXT) == (None, 0)
    assert not corrupt.exists() and kv.disk is not None and kv.disk.stats.misses_bad_file == 1

    # Another model's first block (its bytes intact) under this model's name: a miss.
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    stranger = KVCacheManager(10**9, PrefixDisk(elsewhere, 10**9))
    stranger.serving("m", tiny.model, "f" * 32, True)
    tiny.keep(stranger, PROMPT)
    other = stranger.disk.find("f" * 32, NEXT, True, 0) if stranger.disk else None
    assert other is not None
    [theirs] = [p for p in (elsewhere / ("f" * 32)).iterdir() if p.name.startswith(other.keys[0] + ".")]
    target = directory / theirs.name.replace(other.keys[0], found.keys[0])
    theirs.rename(target)
    kv = tiny.manager(tmp_path)  # finds it as it starts
    assert kv.seed("m", NEXT) == (None, 0)
    assert not target.exists()


def test_files_named_by_the_digest_of_an_earlier_version_still_serve(models: dict[str, Tiny], tmp_path: Path) -> None:
    """Files written before the digest in their names was SHA-256's carry blake2b's: an upgrade keeps them."""
    tiny = models["llama"]
    tiny.keep(tiny.manager(tmp_path), PROMPT)
    for path in (tmp_path / tiny.identity).iterdir():
        key, _, rest = path.name.split(".", 2)
        earlier = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
        path.rename(path.with_name(f"{key}.{earlier}.{rest}"))
    kv = tiny.manager(tmp_path)
    assert kv.seed("m", NEXT)[1] == len(PROMPT)
    assert kv.disk is not None and kv.disk.stats.misses_bad_file == 0


def test_the_tier_keeps_within_its_budget_the_earlier_blocks_last(models: dict[str, Tiny], tmp_path: Path) -> None:
    tiny = models["llama"]
    tiny.keep(tiny.manager(tmp_path), PROMPT)
    sizes = [p.stat().st_size for p in (tmp_path / tiny.identity).iterdir()]
    budget = max(sizes) + min(sizes) // 2  # room for one block
    small = tmp_path / "small"
    tiny.keep(tiny.manager(small, budget), PROMPT)
    kv = tiny.manager(small, budget)
    assert kv.disk is not None and 0 < kv.disk.nbytes <= budget
    assert kv.seed("m", NEXT)[1] == BLOCK_TOKENS  # the first block stayed: the start every prompt shares


def test_a_disk_that_refuses_writes_turns_writing_off_and_fails_nothing(
    models: dict[str, Tiny], tmp_path: Path
) -> None:
    tiny = models["llama"]
    tmp_path.joinpath(tiny.identity).write_text("not a directory")  # every write there fails
    kv = tiny.manager(tmp_path)
    tiny.keep(kv, PROMPT)
    assert kv.disk is not None and not kv.disk.writing
    assert kv.seed("m", NEXT)[1] == len(PROMPT)  # memory serves as before


# -- through the service: a real gateway, worker processes and redis-server, OpenAI's SDK ----------------------

SYSTEM = (
    "You are the coding agent of a team that runs large local models. Read the files before you edit them, "
    "run the tests after every change, name each file you touch and never invent a tool's output. "
) * 24
"""About 2,500 tokens of the demo tokenizer: the blocks a session's start leaves on disk lose at most one
block's tail of it."""


def worker(svc: Service, logs: Path, command: list[str] | None = None, **env: str) -> Process:
    """A worker process for `svc` (as the watchdog would start one, with `env` beside its settings), its pid
    reported healthy."""
    process = Process("worker", {**svc.env, **env}, logs / "worker.log", command)
    deadline = time.monotonic() + 120
    while process.pid not in [w["pid"] for w in svc.http.get("/health").json()["workers"]]:
        assert process.alive(), process.tail()
        assert time.monotonic() < deadline, process.tail()
        time.sleep(0.1)
    return process


def prefix_hits(svc: Service, pid: int) -> dict[str, int]:
    """The prefix tiers' hits of the worker `pid`, from its heartbeat."""
    names = [w["name"] for w in svc.http.get("/health").json()["workers"] if w["pid"] == pid]
    workers = svc.http.get("/v1/admin/status").json()["workers"]
    return next((w.get("prefix_hits") or {} for w in workers if w.get("name") in names), {})


def disk_written(svc: Service, pid: int) -> None:
    """Wait until the worker `pid` has written to disk what it was given to keep, for the answers already
    received: a heartbeat taken since (each job's end pokes one) that counts nothing on its way. An answer's
    prefix goes to the writer before the answer does."""
    since = time.time()
    names = [w["name"] for w in svc.http.get("/health").json()["workers"] if w["pid"] == pid]
    deadline = time.monotonic() + 120
    while True:
        workers = svc.http.get("/v1/admin/status").json()["workers"]
        [beat] = [w for w in workers if w.get("name") in names]
        if beat["at"] >= since and beat["prefix_disk_queued"] == 0:
            return
        assert time.monotonic() < deadline, beat
        time.sleep(0.1)


def turn(client: OpenAI, family: str, messages: list[dict[str, Any]]) -> tuple[str, int, int]:
    answer = client.chat.completions.create(model=family, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    usage = answer.usage
    assert usage is not None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return answer.choices[0].message.content or "", usage.prompt_tokens, cached or 0


@pytest.fixture(scope="module")
def builtins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding the built-in models, built once for the module's services (5-8 s each time)."""
    data = tmp_path_factory.mktemp("builtins")
    for builtin in ("demo", "embed"):
        build_builtin(builtin, Settings(data_dir=data).builtin_model_dir(builtin))
    return data


@pytest.fixture
def disk_service(
    redis_server: RedisServer, tmp_path: Path, models: dict[str, Tiny], builtins: Path
) -> Iterator[tuple[Service, OpenAI, Path]]:
    models_file = tmp_path / "models.toml"
    models_file.write_text("".join(f'[models.{f}]\npath = "{t.path}"\n' for f, t in models.items()))
    data = tmp_path / "data"
    shutil.copytree(builtins, data)  # not built by a worker whose files are fenced
    logs = tmp_path / "logs"
    logs.mkdir()
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/13",
        data,
        logs,
        wait=False,
        models_file=models_file,
        prefix_disk_bytes=10**9,
        heartbeat_interval_s=0.5,
    )
    svc.worker.stop()  # its workers are started, and killed, by the test
    Gateway.wait_answering(svc.base_url, svc.gateway)
    yield svc, OpenAI(base_url=svc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120), logs
    svc.stop()


@pytest.mark.timeout(300)  # four workers started in turn, on a loaded machine
def test_a_session_goes_on_after_its_worker_is_killed_from_the_disk_tier_as_a_cold_run_would(
    disk_service: tuple[Service, OpenAI, Path],
) -> None:
    svc, client, logs = disk_service
    running = worker(svc, logs)
    sessions: dict[str, list[dict[str, Any]]] = {}
    before: dict[str, int] = {}
    for family in ("llama", "qwen3_next"):
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM + family}]
        for n in range(2):
            messages.append({"role": "user", "content": f"Turn {n}: which file holds the settings?"})
            text, prompt, _ = turn(client, family, messages)
            messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": "Turn 2: and which test covers it?"})
        sessions[family], before[family] = messages, prompt
    assert before["llama"] > 2000

    disk_written(svc, running.pid)  # a kill in a file's write makes it a miss (test_a_truncated_corrupt_...)
    os.kill(running.pid, signal.SIGKILL)
    running.popen.wait(30)
    running = worker(svc, logs)
    # Before its first job, the new worker says what its disk holds: the sessions' next turns come to it.
    [name] = [w["name"] for w in svc.http.get("/health").json()["workers"] if w["pid"] == running.pid]
    published = Redis.from_url(svc.env["MLXQ_REDIS_URL"]).scard(keys.worker_prefixes(name))
    assert published >= 0.9 * sum(before.values()) / BLOCK_TOKENS, (published, before)
    resumed = {family: turn(client, family, messages) for family, messages in sessions.items()}
    for family, (_, _, cached) in resumed.items():
        assert cached >= 0.9 * before[family], (family, cached, before[family])
    hits = svc.http.get("/v1/admin/status").json()["workers"]
    assert any((w.get("prefix_hits") or {}).get("disk", 0) >= 2 for w in hits), hits

    disk_written(svc, running.pid)
    # Started again by the watchdog (which names the models the dead worker held), a worker loads them and reads
    # their recent prompts back from disk before any request: the sessions' turns find them in memory.
    os.kill(running.pid, signal.SIGKILL)
    running.popen.wait(30)
    running = worker(svc, logs, MLXQ_RELOAD_MODELS=",".join(sessions))
    deadline = time.monotonic() + 120
    while (read := prefix_hits(svc, running.pid).get("read_ahead", 0)) < len(sessions):
        assert time.monotonic() < deadline, (read, running.tail())
        time.sleep(0.2)
    for family, messages in sessions.items():
        assert turn(client, family, messages)[2] >= 0.9 * before[family], family
    hits = prefix_hits(svc, running.pid)
    assert hits["memory"] >= len(sessions) and hits["disk"] == 0, hits

    # Cold: nothing kept anywhere, the same answers.
    os.kill(running.pid, signal.SIGKILL)
    running.popen.wait(30)
    shutil.rmtree(svc.env["MLXQ_DATA_DIR"] + "/prefixes")
    running = worker(svc, logs)
    for family, messages in sessions.items():
        text, _, cached = turn(client, family, messages)
        assert cached == 0
        assert text == resumed[family][0], family
    running.stop()


def test_a_disk_that_refuses_writes_fails_no_job(disk_service: tuple[Service, OpenAI, Path]) -> None:
    svc, client, logs = disk_service
    # Files may grow to 64 KiB (the log's own lines fit): every block of this session's cache (the wide model's)
    # is larger.
    limit = 64 << 10
    fenced = f"import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
    running = worker(svc, logs, [sys.executable, "-c", fenced + "runpy.run_module('worker', run_name='__main__')"])
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for n in range(3):
        messages.append({"role": "user", "content": f"Turn {n}: which file holds the settings?"})
        text, _, cached = turn(client, "wide", messages)
        messages.append({"role": "assistant", "content": text})
        if n > 0:
            assert cached > 2000  # memory serves as before
    [status] = svc.http.get("/v1/admin/status").json()["workers"]
    assert status["prefix_disk_writing"] is False and status["prefix_disk_bytes"] == 0
    metrics = svc.http.get("/metrics").text
    assert f'mlxq_prefix_disk_writing{{worker="{status["name"]}"}} 0.0' in metrics
    assert f'mlxq_prefix_disk_queued{{worker="{status["name"]}"}}' in metrics
    assert "the prefix disk tier stops writing" in running.tail(200)
    running.stop()
