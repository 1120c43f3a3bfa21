"""A model's download as a record in Redis: asked for by a gateway, done by a worker's download thread.

The record (one hash per model name) holds the state (`queued`, `downloading`,
`done`, `failed`), the repo, bytes done and in all, the error, and which worker
holds it with its last sign of life. While a pull is queued or downloading its
model's name is in `keys.PULLING`, and claim.lua leaves that model's jobs in their
queue, so a job waits for its model without taking a worker's batch slot. A
worker that dies mid-download stops beating; after `STALE_S` another (or the
restarted one) takes the pull over and huggingface_hub resumes the partial file.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis

from shared import keys
from shared.live_models import store, stored_entries

STALE_S = 10.0
"""A downloading pull whose worker has not beaten for this long is taken over (it died)."""

BEAT_S = 1.0
"""How often a download's progress (and its worker's sign of life) is written."""

PENDING = ("queued", "downloading")

_CLAIM = """
local state = redis.call("HGET", KEYS[1], "state")
local beat = tonumber(redis.call("HGET", KEYS[1], "beat_at") or "0")
if state == "queued" or (state == "downloading" and tonumber(ARGV[2]) - beat > tonumber(ARGV[3])) then
  redis.call("HSET", KEYS[1], "state", "downloading", "worker", ARGV[1], "beat_at", ARGV[2])
  return 1
end
return 0
"""


def read(redis: Redis, name: str) -> dict[str, Any] | None:
    """The pull of model `name` as the API shows it, or None when there is none."""
    raw = redis.hgetall(keys.pull(name))
    if not raw:
        return None
    record: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
    for field in ("total_bytes", "done_bytes"):
        record[field] = int(record.get(field) or 0)
    for field in ("created_at", "beat_at", "finished_at"):
        if field in record:
            record[field] = float(record[field])
    total = record["total_bytes"]
    record["percent"] = round(100 * min(record["done_bytes"], total) / total, 1) if total else None
    return record


def every(redis: Redis) -> list[dict[str, Any]]:
    """Every pull with a record; names whose record expired leave the set."""
    found = []
    for name in sorted(_text(n) for n in redis.smembers(keys.PULLS)):
        record = read(redis, name)
        if record is None:
            redis.srem(keys.PULLS, name)
        else:
            found.append(record)
    return found


def start(redis: Redis, name: str, repo: str, revision: str | None, total_bytes: int, entry: dict[str, Any]) -> bool:
    """Queue the download of `repo` as model `name` (registered as `entry` once it is here); False
    when that model's pull is already queued or running (then it goes on as it is)."""
    now = time.time()
    record = {
        "name": name,
        "repo": repo,
        "revision": revision or "",
        "state": "queued",
        "total_bytes": total_bytes,
        "done_bytes": 0,
        "error": "",
        "worker": "",
        "entry": json.dumps(entry),
        "created_at": now,
        "beat_at": 0,
    }
    fields = [str(part) for pair in record.items() for part in pair]
    # One step: two gateways starting the same pull at once must not reset one a worker holds.
    return bool(redis.eval(_START, 3, keys.pull(name), keys.PULLS, keys.PULLING, name, *fields))


_START = """
local state = redis.call("HGET", KEYS[1], "state")
if state == "queued" or state == "downloading" then return 0 end
redis.call("DEL", KEYS[1])
redis.call("HSET", KEYS[1], unpack(ARGV, 2))
redis.call("SADD", KEYS[2], ARGV[1])
redis.call("SADD", KEYS[3], ARGV[1])
return 1
"""

_MINE = """
if redis.call("HGET", KEYS[1], "worker") ~= ARGV[1] or redis.call("HGET", KEYS[1], "state") ~= "downloading" then
  return 0
end
if ARGV[2] ~= "" then
  redis.call("HSET", KEYS[1], "done_bytes", ARGV[2], "beat_at", ARGV[3])
end
return 1
"""


def claim(redis: Redis, name: str, worker: str) -> bool:
    """Take the pull for this worker: a queued one, or one whose worker stopped beating."""
    return bool(redis.eval(_CLAIM, 1, keys.pull(name), worker, repr(time.time()), repr(STALE_S)))


def progress(redis: Redis, name: str, worker: str, done_bytes: int) -> bool:
    """Write the bytes done and the worker's sign of life; False when the pull is no longer this
    worker's (removed, or taken over after a silence): then its download stops."""
    return bool(redis.eval(_MINE, 1, keys.pull(name), worker, str(done_bytes), repr(time.time())))


def finish(redis: Redis, name: str, worker: str, entry: dict[str, Any], done_bytes: int) -> bool:
    """The files are here: the model is registered (over what its entry says now: a pin set while it
    downloaded stays), and the jobs waiting for it may be claimed. False, and nothing written, when
    the pull is no longer this worker's (the model was removed meanwhile)."""
    if not redis.eval(_MINE, 1, keys.pull(name), worker, "", ""):
        return False
    store(redis, name, {**stored_entries(redis).get(name, {}), **entry})
    _end(redis, name, {"state": "done", "done_bytes": done_bytes})
    return True


def fail(redis: Redis, name: str, worker: str, error: str) -> None:
    """The pull cannot be done; the jobs waiting for the model are claimed, and fail as a hub model
    that is not here does (naming `mlxq pull`)."""
    if redis.eval(_MINE, 1, keys.pull(name), worker, "", ""):
        _end(redis, name, {"state": "failed", "error": error})


def _end(redis: Redis, name: str, fields: dict[str, Any]) -> None:
    key = keys.pull(name)
    with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={**fields, "finished_at": repr(time.time())})  # type: ignore[dict-item]
        pipe.expire(key, keys.PULL_TTL_S)
        pipe.srem(keys.PULLING, name)
        pipe.rpush(keys.WAKE, 1)  # an idle worker wakes and claims what waited
        pipe.ltrim(keys.WAKE, -keys.WAKE_MAX, -1)
        pipe.execute()


def forget(redis: Redis, name: str) -> None:
    """Drop the pull's record (the model was removed); a running download ends as failed."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.pull(name))
        pipe.srem(keys.PULLS, name)
        pipe.srem(keys.PULLING, name)
        pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
