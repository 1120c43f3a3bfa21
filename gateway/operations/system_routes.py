"""Health: open to everyone, even when API keys are required."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from gateway.deps import GatewayDep, RedisDep, SettingsDep, sees_everything
from gateway.operations.workers import live_workers
from shared import circuit, keys, memory
from shared.outage import UNREACHABLE
from shared.redis_errors import condition_of
from shared.text import text

router = APIRouter(tags=["system"])

WORKER_FIELDS = (
    "name",
    "host",
    "pid",
    "state",
    "jobs",
    "models",
    "model_budget_bytes",
    "model_held_bytes",
    "memory",
    "last_seen_s",
)


@router.get("/health")
def health(request: Request, redis: RedisDep, gw: GatewayDep, settings: SettingsDep) -> JSONResponse:
    """Memory status by the 85/95 % thresholds, live workers, queue depth, circuit and admission counts.

    503 when no worker is alive, or Redis refuses writes. With API keys set, the jobs each worker runs
    are listed for admin keys only (the route itself is open).
    """
    shown = WORKER_FIELDS if sees_everything(request) else tuple(f for f in WORKER_FIELDS if f != "jobs")
    try:
        workers = live_workers(redis)
    except RedisError as exc:
        # The shape operators script against, even now: degraded, with this machine's memory.
        down = {
            "status": "degraded",
            "memory": memory.snapshot(settings),
            "workers": [],
            "redis": {"writable": False, "condition": condition_of(exc)},
            "error": f"Redis: {exc}",
        }
        return JSONResponse(down, status_code=503, headers={"Retry-After": "5"})
    writes = _writable(redis)
    reported = [w["memory"] for w in workers if isinstance(w.get("memory"), dict)]
    # The worst machine speaks for the service; with no worker, this machine's own reading.
    mem = max(reported, key=lambda m: float(m["used_percent"])) if reported else memory.snapshot(settings)
    status = memory.status_for(float(mem["used_percent"]), settings) if workers and writes is None else "degraded"
    breaker = circuit.read(redis)
    refused = {text(k): int(v) for k, v in redis.hgetall(keys.REFUSALS).items()}
    body: dict[str, Any] = {
        "status": status,
        "memory": mem,
        "workers": [{k: w.get(k) for k in shown} for w in workers],
        "redis": {"writable": True} if writes is None else {"writable": False, "condition": writes},
        "queues": {queue.name: queue.count for queue in gw.queues.values()},
        "circuit": {"state": breaker.state.value, "failures": breaker.failures},
        "admission": {"admitted": int(redis.get(keys.ADMITTED) or 0), "refused": refused},
    }
    if writes is not None:
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(body, status_code=200 if workers else 503)


def _writable(redis: Redis) -> str | None:
    """None when Redis takes a write; else what it is (full disk, read-only, out of memory...): reads
    go on working then, so only a write shows it."""
    try:
        redis.set(keys.HEALTH_PROBE, "1", px=10_000)
    except UNREACHABLE as exc:
        return condition_of(exc)
    return None


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the service's figures (open, like /health)."""
    body = await run_in_threadpool(generate_latest, request.app.state.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
