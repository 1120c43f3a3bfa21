"""Health: open to everyone, even when API keys are required."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from gateway.deps import GatewayDep, RedisDep, SettingsDep
from gateway.workers import live_workers
from shared import circuit, keys, memory
from shared.text import text

router = APIRouter(tags=["system"])


@router.get("/health")
def health(redis: RedisDep, gw: GatewayDep, settings: SettingsDep) -> JSONResponse:
    """Memory status by the 85/95 % thresholds, live workers, queue depth, circuit and admission counts.

    503 when no worker is alive.
    """
    try:
        workers = live_workers(redis)
    except RedisError as exc:
        # The shape operators script against, even now: degraded, with this machine's memory.
        down = {"status": "degraded", "memory": memory.snapshot(settings), "workers": [], "error": f"Redis: {exc}"}
        return JSONResponse(down, status_code=503, headers={"Retry-After": "5"})
    reported = [w["memory"] for w in workers if isinstance(w.get("memory"), dict)]
    # The worst machine speaks for the service; with no worker, this machine's own reading.
    mem = max(reported, key=lambda m: float(m["used_percent"])) if reported else memory.snapshot(settings)
    status = memory.status_for(float(mem["used_percent"]), settings) if workers else "degraded"
    breaker = circuit.read(redis)
    refused = {text(k): int(v) for k, v in redis.hgetall(keys.REFUSALS).items()}
    body: dict[str, Any] = {
        "status": status,
        "memory": mem,
        "workers": [
            {
                k: w.get(k)
                for k in (
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
            }
            for w in workers
        ],
        "queues": {queue.name: queue.count for queue in gw.queues.values()},
        "circuit": {"state": breaker.state.value, "failures": breaker.failures},
        "admission": {"admitted": int(redis.get(keys.ADMITTED) or 0), "refused": refused},
    }
    return JSONResponse(body, status_code=200 if workers else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the service's figures (open, like /health)."""
    body = await run_in_threadpool(generate_latest, request.app.state.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
