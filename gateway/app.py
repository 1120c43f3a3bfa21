"""The FastAPI application, built from settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis import BlockingConnectionPool as SyncBlockingPool
from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from rq import Queue
from starlette.concurrency import run_in_threadpool

from gateway.admission.admit import Admission
from gateway.admission.clients import ClientResolver
from gateway.admission.prompt_limits import PromptLimits
from gateway.admission.refusals import RefusalCache
from gateway.anthropic.routes import router as anthropic_routes
from gateway.deps import Gateway, get_client
from gateway.errors import count_refusal, install_error_handlers
from gateway.http import openapi_schema
from gateway.http.body_limit import BodySizeLimit
from gateway.http.received import ArrivalClock
from gateway.http.slow_clients import SlowClientLimits
from gateway.jobs.batch_routes import router as batch_routes
from gateway.jobs.records import JobFactory, finished_result
from gateway.jobs.routes import router as job_routes
from gateway.models import management
from gateway.models.routes import router as model_routes
from gateway.ollama import shapes as ollama_shapes
from gateway.ollama.embeddings import router as ollama_embedding_routes
from gateway.ollama.routes import router as ollama_routes
from gateway.openai.embeddings import router as openai_embedding_routes
from gateway.openai.routes import router as openai_routes
from gateway.operations.admin_routes import router as admin_routes
from gateway.operations.events_routes import router as events_routes
from gateway.operations.metrics import registry_for
from gateway.operations.system_routes import router as system_routes
from gateway.responses.routes import router as responses_routes
from gateway.streams.cancels import PendingCancels
from gateway.streams.hub import StreamHub
from shared.events import record_outages
from shared.json_bytes import JobSerializer
from shared.live_models import LiveModels
from shared.models import ModelRegistry
from shared.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """A gateway for `settings`; its Redis connections open with the app and close with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Before the first request: counting a prompt as the model sees it needs its chat template.
        await run_in_threadpool(app.state.limits.warm)
        # Fixed pools, one for the calls made from threads and one for the async ones: callers wait
        # for a connection rather than open one more (streams hold none: one reader serves them all),
        # so a burst of requests cannot open as many connections as the thread pool has threads.
        size = settings.redis_connections
        threads_pool = SyncBlockingPool.from_url(settings.redis_url, max_connections=size, timeout=10)
        app.state.redis = Redis(connection_pool=threads_pool)
        record_outages(app.state.redis, "gateway")
        # A connection Redis dropped (it restarted) is tried again once, so the first request after a
        # restart is not refused for it (admission.lua knows a call made twice).
        retry = AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        pool = BlockingConnectionPool.from_url(settings.redis_url, max_connections=size, timeout=10, retry=retry)
        app.state.aredis = AsyncRedis(connection_pool=pool)
        app.state.streams = StreamHub(app.state.aredis, lambda job_id: finished_result(job_id, app.state.redis))
        app.state.streams.start()
        names = {"interactive": settings.queue_interactive, "normal": settings.queue_name, "low": settings.queue_batch}
        queues = {p: Queue(name, connection=app.state.redis, serializer=JobSerializer) for p, name in names.items()}
        try:
            # Registered up front, so rq-dashboard lists every queue before its first job.
            app.state.redis.sadd(queues["normal"].redis_queues_keys, *[q.key for q in queues.values()])
        except RedisError as exc:
            # Start anyway: until Redis is back, every request is refused with 503 and Retry-After.
            logger.warning("Redis unreachable at start-up: %s", exc)
        admission = Admission(app.state.aredis, settings, list(queues.values()))
        refusals = RefusalCache(settings.refusal_hold_s)
        factories = {p: JobFactory(queue, settings) for p, queue in queues.items()}
        live = LiveModels(settings, app.state.redis, app.state.models).start()
        pull_missing = partial(management.ensure_pulled, app.state.redis, app.state.models)
        app.state.gateway = Gateway(settings, app.state.limits, admission, queues, refusals, factories, pull_missing)
        app.state.metrics = registry_for(app.state.redis, list(queues.values()))
        flusher = asyncio.create_task(_flush_every_second(app, refusals))
        try:
            yield
        finally:
            live.stop()
            flusher.cancel()
            await app.state.streams.stop()
            await refusals.flush(app.state.aredis)
            app.state.redis.close()
            await app.state.aredis.aclose()

    app = FastAPI(
        title="mlxq",
        summary="Queue-based LLM inference for MLX",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.cancels = PendingCancels()
    app.state.models = ModelRegistry.from_settings(settings)
    app.state.clients = ClientResolver(settings)
    app.state.limits = PromptLimits(app.state.models, settings)
    # A path under a protocol's prefix that no route matches still answers in that protocol's shape.
    app.state.error_prefixes = {"/api/": ollama_shapes.error_body}
    install_error_handlers(app)
    openapi_schema.install(app, [spec.name for spec in app.state.models.all()] + list(app.state.models.aliases))
    authenticated = [Depends(get_client)]
    app.include_router(job_routes, dependencies=authenticated)
    app.include_router(openai_routes, dependencies=authenticated)
    app.include_router(openai_embedding_routes, dependencies=authenticated)
    app.include_router(batch_routes, dependencies=authenticated)
    app.include_router(model_routes, dependencies=authenticated)
    app.include_router(admin_routes, dependencies=authenticated)
    app.include_router(events_routes, dependencies=authenticated)
    app.include_router(ollama_routes, dependencies=authenticated)
    app.include_router(ollama_embedding_routes, dependencies=authenticated)
    app.include_router(anthropic_routes, dependencies=authenticated)
    app.include_router(responses_routes, dependencies=authenticated)
    app.include_router(system_routes)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        on_refusal=lambda: count_refusal(app, "request_too_large"),
    )
    app.add_middleware(SlowClientLimits, unread_s=settings.unread_limit_s, body_s=settings.body_read_limit_s)
    if settings.cors_origins:
        # Outermost, so that refusals (413, 401, 429) carry the CORS headers a browser needs to read them.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=[
                "x-mlxq-job-id",
                "x-mlxq-max-tokens",
                "Retry-After",
                "x-should-retry",
                "x-ratelimit-remaining-requests",
            ],
            max_age=600,
        )
    app.add_middleware(ArrivalClock)  # last added runs first
    return app


async def _flush_every_second(app: FastAPI, refusals: RefusalCache) -> None:
    """What a gateway keeps in memory until Redis takes it: refusal counts, cancels."""
    while True:
        await asyncio.sleep(1.0)
        await refusals.flush(app.state.aredis)
        if len(app.state.cancels):
            await run_in_threadpool(app.state.cancels.flush, app.state.redis, app.state.settings.stream_ttl_s)
