"""Admission: the shared-state checks and the enqueue, as one atomic Redis script.

Circuit state, memory emergency, per-client rate, per-client in-flight cap and
queue depth are decided and the jobs written in the same script (admission.lua),
so several gateways can never together admit past a limit, and a refusal costs
one round trip. The rate window counts requests (a batch is one); the in-flight
caps and the queue depth count generations, with a cap of its own for the batch
tier. A request bigger than a limit on its own is refused before the script,
without a Retry-After, since no wait would let it in. A rate-limit library (such as `limits`) would need a second,
separate round trip and could not be atomic with the enqueue, hence the script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.job import Job

from gateway.admission.clients import Client
from gateway.jobs.records import DeferredJob, JobRecord
from shared import keys
from shared.errors import (
    BatchTooLarge,
    CircuitOpen,
    IdempotencyConflict,
    InsufficientMemory,
    MlxqError,
    QueueFull,
    RateLimited,
    TooManyInflight,
)
from shared.outage import REDIS
from shared.settings import Settings
from shared.text import text

SCRIPT = resources.files("gateway.admission").joinpath("admission.lua").read_text()


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key, the hash of the request it came with, and the id to remember for it."""

    key: str
    request_hash: str
    remember_id: str


Tier = Literal["single", "batch"]
"""`batch`: batch children and low-priority jobs, served in turns by client; `single`: the rest."""


@dataclass(frozen=True)
class BatchWrite:
    """A batch's record and its deferred synthesis, written in the same step as its children."""

    batch_id: str
    record: str
    synthesis: DeferredJob | None


@dataclass(frozen=True)
class Admitted:
    """What admission decided: either the jobs are in (`rate` set), or this repeats `duplicate_of`."""

    rate: RateState | None = None
    duplicate_of: str | None = None


@dataclass(frozen=True)
class RateState:
    """A client's rate window after this request, for the `x-ratelimit-*` headers."""

    limit: int
    remaining: int
    reset_s: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(max(0, self.remaining)),
            "x-ratelimit-reset-requests": _duration(self.reset_s),
        }


class Admission:
    """Decides and enqueues atomically; every refusal raises a typed error with Retry-After."""

    def __init__(self, redis: AsyncRedis, settings: Settings, counted_queues: list[Queue]) -> None:
        self._settings = settings
        self._script = redis.register_script(script_for(settings))
        self._queue_keys = [queue.key for queue in counted_queues]
        self._queues_set = counted_queues[0].redis_queues_keys

    def check_size(self, count: int, tier: Tier) -> None:
        """Refuse, for good, a request with more jobs than a limit allows on its own."""
        s = self._settings
        limits = [("MLXQ_MAX_QUEUED", s.max_queued, "generations waiting in all queues")]
        if tier == "batch":
            limits.append(
                ("MLXQ_MAX_BATCH_INFLIGHT_PER_CLIENT", s.max_batch_inflight_per_client, "batch jobs per client")
            )
        else:
            limits.append(("MLXQ_MAX_INFLIGHT_PER_CLIENT", s.max_inflight_per_client, "jobs per client"))
        for name, limit, what in limits:
            if count > limit:
                raise BatchTooLarge(
                    f"This request has {count} generations; {name} allows {limit} {what} at a time, so it can "
                    "never be admitted as it is: split it into smaller batches",
                    param="requests",
                )

    async def admit(
        self,
        client: Client,
        jobs: list[JobRecord],
        tier: Tier,
        request_id: str,
        idempotency: Idempotency | None = None,
        batch: BatchWrite | None = None,
    ) -> Admitted:
        """Enqueue every job, or none of them and raise why; a repeated Idempotency-Key enqueues nothing."""
        s = self._settings
        synthesis = batch.synthesis if batch else None
        argv: list[Any] = [
            len(jobs),
            idempotency.request_hash if idempotency else "",
            idempotency.remember_id if idempotency else "",
            s.idempotency_ttl_s * 1000,
            tier,
            client.tag,
            request_id,
            batch.batch_id if batch else "",
            batch.record if batch else "",
            _netstrings([synthesis.id.encode(), synthesis.registry_key.encode(), *synthesis.fields])
            if synthesis
            else "",
        ]
        for job in jobs:
            argv.append(_netstrings([job.id.encode(), job.queue_key.encode(), *job.fields]))
        reply = await self._script(
            keys=[
                keys.CIRCUIT,
                keys.WORKER_MEMORY,
                keys.client_rate(client.id),
                keys.client_inflight(client.id, tier),
                keys.JOB_ENDS,
                keys.REFUSALS,
                keys.ADMITTED,
                self._queues_set,
                # Without a key, a name the script never writes (it only reads it when ARGV[2] is set).
                keys.idempotency(client.id, idempotency.key if idempotency else ""),
                # Like the Idempotency-Key: a name never written unless this is a batch.
                keys.batch(batch.batch_id if batch else ""),
                keys.BATCH_OWNERS,
                keys.BATCH_RING,
                keys.batch_turns(client.tag),
                keys.WAKE,
                keys.OPEN_BATCHES,
                keys.WORKER_CAPACITY,
                *self._queue_keys,
            ],
            args=argv,
        )
        REDIS.ok()
        outcome = text(reply[0])
        if outcome == "ok":
            return Admitted(rate=RateState(limit=int(reply[1]), remaining=int(reply[2]), reset_s=int(reply[3]) / 1000))
        if outcome == "duplicate":
            return Admitted(duplicate_of=text(reply[2]))
        raise _refusal(outcome, int(reply[1]), text(reply[2]), text(reply[3]), s, len(jobs), tier)


def script_for(settings: Settings) -> str:
    """admission.lua with this gateway's limits written in."""
    constants = {
        "rate_limit": settings.rate_limit_requests,
        "rate_window_ms": settings.rate_limit_window_s * 1000,
        "max_inflight": settings.max_inflight_per_client,
        "max_batch_inflight": settings.max_batch_inflight_per_client,
        "wake_max": keys.WAKE_MAX,
        "max_queued": settings.max_queued,
        "emergency_percent": settings.memory_emergency_percent,
        "fresh_ms": settings.heartbeat_ttl_s * 1000,
        "drain_window_ms": settings.drain_window_s * 1000,
        "fallback_retry_s": settings.queue_full_fallback_retry_after_s,
        "memory_retry_s": settings.memory_retry_after_s,
        "job_prefix": Job.redis_job_namespace_prefix,
        "inflight_ttl_ms": settings.result_ttl_s * 1000,
    }
    script = SCRIPT
    for name, value in constants.items():
        script = script.replace("{{" + name + "}}", str(value))
    return script


def _refusal(
    reason: str, retry_after_s: int, first: str, second: str, s: Settings, count: int, tier: Tier
) -> MlxqError:
    error: MlxqError
    if reason == "idempotency_conflict":
        error = IdempotencyConflict(
            f"This Idempotency-Key was already used for a different request (which created {first}); "
            "use a new key for a new request",
            param="Idempotency-Key",
        )
    elif reason == "circuit_open":
        error = CircuitOpen(
            f"Workers are failing to start; the next trial start is in {retry_after_s} s",
            retry_after_s=retry_after_s,
        )
    elif reason == "insufficient_memory":
        error = InsufficientMemory(
            f"Every worker reports memory use at or above {second} % (worst {first} %); no new work is taken",
            retry_after_s=retry_after_s,
        )
    elif reason == "rate_limited":
        error = RateLimited(
            f"Rate limit of {s.rate_limit_requests} submissions per {s.rate_limit_window_s} s reached",
            retry_after_s=retry_after_s,
        )
        error.extra_headers = RateState(s.rate_limit_requests, int(first), int(second) / 1000).headers()
    elif reason == "too_many_inflight":
        kind = "batch jobs (batch children and low-priority jobs)" if tier == "batch" else "jobs"
        adds = f"this request adds {count}, " if count > 1 else ""
        error = TooManyInflight(
            f"You have {first} {kind} queued or running; {adds}the limit is {second} at a time; at the current "
            f"drain rate there is room in about {retry_after_s} s",
            retry_after_s=retry_after_s,
        )
    elif reason == "queue_full":
        error = QueueFull(
            f"The queues hold {first} generations, this request adds {count} and the limit is {second}; at the "
            f"current drain rate there is room in about {retry_after_s} s",
            retry_after_s=retry_after_s,
        )
    else:
        raise RuntimeError(f"admission script answered {reason!r}")
    error.counted = True
    return error


def _netstrings(parts: list[bytes]) -> bytes:
    """`len:bytes,` for each part, which the script splits back apart."""
    return b"".join(b"%d:%s," % (len(part), part) for part in parts)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `1h2m3s`."""
    whole = max(0, math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
