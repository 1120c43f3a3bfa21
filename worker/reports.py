"""What a worker tells the gateways through Redis, stamped with Redis's clock.

The gateway's admission script compares these stamps with Redis `TIME`, so they
must come from the same clock, not from this machine's.
"""

from __future__ import annotations

from collections.abc import Callable

from redis import Redis
from redis.client import Pipeline

from shared import keys

_MEMORY = """#!lua
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("HSET", KEYS[1], ARGV[1], ARGV[2] .. " " .. now)
"""

_JOB_END = """#!lua
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZADD", KEYS[1], now, ARGV[1])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now - tonumber(ARGV[2]))
if ARGV[4] ~= "" then
  redis.call("HSET", KEYS[2], ARGV[3], ARGV[4] .. " " .. now)
end
"""

SMOOTHING = 0.2
"""Weight of the newest job in the running mean of job durations."""


class Reports:
    def __init__(self, redis: Redis, worker_name: str, drain_window_s: int) -> None:
        self._redis = redis
        self._name = worker_name
        self._drain_window_ms = drain_window_s * 1000
        self._memory = redis.register_script(_MEMORY)
        self._job_end = redis.register_script(_JOB_END)
        self._mean_job_s: float | None = None

    def memory(self, used_percent: float) -> None:
        """This worker's memory use, read by admission's emergency check."""
        self._memory(keys=[keys.WORKER_MEMORY], args=[self._name, f"{used_percent:.1f}"])

    def job_ended(self, job_id: str, took_s: float | None, batch: int) -> None:
        """A job left this worker (any outcome; `took_s` for one that finished), with room for `batch`
        at a time: the drain rate and the capacity behind the Retry-After of queue_full and
        too_many_inflight."""
        self.ending(job_id, took_s, batch)(self._redis)

    def ending(self, job_id: str, took_s: float | None, batch: int) -> Callable[[Redis | Pipeline], None]:
        """`job_ended`, its time counted now and its write left to the caller: alone, or in the transaction
        that ends the job (as often as that is retried)."""
        if took_s is not None:
            took_s = max(took_s, 0.05)
            last = self._mean_job_s
            self._mean_job_s = took_s if last is None else last + SMOOTHING * (took_s - last)
        capacity = "" if self._mean_job_s is None else f"{batch / self._mean_job_s:.3f}"
        args: list[str | int] = [job_id, self._drain_window_ms, self._name, capacity]
        return lambda client: self._job_end(keys=[keys.JOB_ENDS, keys.WORKER_CAPACITY], args=args, client=client)

    def withdraw(self) -> None:
        self._redis.hdel(keys.WORKER_MEMORY, self._name)
        self._redis.hdel(keys.WORKER_CAPACITY, self._name)
