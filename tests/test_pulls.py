"""A pull's record in a real Redis: one start, one holder, nothing written back once it is removed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from redis import Redis

from shared import keys, pulls
from shared.live_models import stored_entries
from tests.support.redis_servers import RedisServer


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/12")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_a_pull_starts_once_and_is_held_by_one_worker(db: Redis) -> None:
    assert pulls.start(db, "coder", "team/coder", None, 100, {"repo": "team/coder"})
    assert not pulls.start(db, "coder", "team/coder", None, 100, {"repo": "team/coder"})  # goes on as it is
    assert db.sismember(keys.PULLING, "coder")
    assert pulls.claim(db, "coder", "w1")
    assert not pulls.claim(db, "coder", "w2")  # w1 beats
    assert pulls.progress(db, "coder", "w1", 40)
    assert not pulls.progress(db, "coder", "w2", 50)
    record = pulls.read(db, "coder")
    assert record is not None and record["done_bytes"] == 40 and record["percent"] == 40.0
    assert pulls.finish(db, "coder", "w1", {"repo": "team/coder", "pulled": True}, 100)
    assert not db.sismember(keys.PULLING, "coder")
    assert stored_entries(db)["coder"] == {"repo": "team/coder", "pulled": True}
    assert pulls.start(db, "coder", "team/coder", None, 100, {})  # a done pull may be asked for again


def test_a_silent_holder_is_taken_over_and_then_writes_nothing(db: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    pulls.start(db, "coder", "team/coder", None, 100, {"repo": "team/coder"})
    assert pulls.claim(db, "coder", "w1")
    monkeypatch.setattr(pulls, "STALE_S", 0.0)
    time.sleep(0.01)
    assert pulls.claim(db, "coder", "w2")
    assert not pulls.progress(db, "coder", "w1", 10)  # w1's download stops at its next beat
    assert not pulls.finish(db, "coder", "w1", {"repo": "team/coder"}, 100)
    pulls.fail(db, "coder", "w1", "late")
    record = pulls.read(db, "coder")
    assert record is not None and record["state"] == "downloading" and record["worker"] == "w2"


def test_a_removed_pull_is_not_brought_back_by_its_download(db: Redis) -> None:
    pulls.start(db, "gone", "team/gone", None, 100, {"repo": "team/gone"})
    assert pulls.claim(db, "gone", "w1")
    pulls.forget(db, "gone")
    assert not pulls.progress(db, "gone", "w1", 10)
    assert not pulls.finish(db, "gone", "w1", {"pulled": True}, 100)
    assert not db.exists(keys.pull("gone")) and "gone" not in stored_entries(db)
