"""The FastAPI application, built from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis import Redis

from gateway.errors import install_error_handlers
from gateway.routes import jobs, system
from shared.models import ModelRegistry
from shared.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    """A gateway for `settings`; the Redis connection opens with the app and closes with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = Redis.from_url(settings.redis_url)
        try:
            yield
        finally:
            app.state.redis.close()

    app = FastAPI(
        title="mlxq",
        summary="Queue-based LLM inference for MLX",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.models = ModelRegistry.from_settings(settings)
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(system.router)
    return app
