"""Redis refusing work, told apart from a bug: one classification for every process.

A Redis that cannot write its AOF (a full disk) answers `MISCONF`; a replica
promoted away, `READONLY`; one at `maxmemory`, `OOM`; one short of
`min-replicas-to-write`, `NOREPLICAS`; one running a long script, `BUSY`; one
replaying its AOF, `LOADING`; one made a replica while a client blocks in BLPOP
answers that client `UNBLOCKED`. Each passes, as being unreachable does: the
gateway answers 503 with a Retry-After, workers and the watchdog wait and retry.
redis-py raises most of them as plain `ResponseError`s, which every `except`
for an outage would miss (and RQ's loop would die of), so its own table of
error codes maps them here to `RedisRefusing` (keeping their old class too:
`ReadOnlyError`, `OutOfMemoryError`), which shared/outage.py's UNREACHABLE
includes. They stay ResponseErrors, not ConnectionErrors: redis-py would retry
a ConnectionError itself, reconnecting ten times per command (seconds per
refusal, a pipeline run again whole), and turn one met under WATCH into a
WatchError that RQ retries at once, for ever. LOADING is redis-py's own
ConnectionError already. Every other `ResponseError` is a bug and stays one.
"""

from __future__ import annotations

from redis._parsers.base import BaseParser
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class RedisRefusing(ResponseError):
    """Redis answers, but refuses this for now."""

    condition = "refusing commands"


class RedisCannotPersist(RedisRefusing):
    condition = "cannot persist (MISCONF)"


class RedisReadOnly(RedisRefusing, ReadOnlyError):
    condition = "read-only (READONLY)"


class RedisOutOfMemory(RedisRefusing, OutOfMemoryError):
    condition = "out of memory (OOM)"


class RedisNoReplicas(RedisRefusing):
    condition = "too few replicas (NOREPLICAS)"


class RedisBusy(RedisRefusing):
    condition = "busy running a script (BUSY)"


class RedisMasterDown(RedisRefusing):
    condition = "its master is down (MASTERDOWN)"


class RedisUnblocked(RedisRefusing):
    """A blocking command (the worker's BLPOP for new jobs) cut short: the instance turned replica
    under it, or a client unblocked it. Waited out and tried again, as the others are."""

    condition = "changing role (UNBLOCKED)"


_BY_CODE = {
    "MISCONF": RedisCannotPersist,
    "READONLY": RedisReadOnly,
    "OOM": RedisOutOfMemory,
    "NOREPLICAS": RedisNoReplicas,
    "BUSY": RedisBusy,
    "MASTERDOWN": RedisMasterDown,
    "UNBLOCKED": RedisUnblocked,
}
BaseParser.EXCEPTION_CLASSES.update(_BY_CODE)


def condition_of(exc: BaseException) -> str:
    """What a Redis outage looks like, in words for logs and /health."""
    if isinstance(exc, RedisRefusing):
        return exc.condition
    if isinstance(exc, BusyLoadingError):
        return "loading its data (LOADING)"
    if isinstance(exc, RedisTimeoutError):
        return "not answering in time"
    return "unreachable"
