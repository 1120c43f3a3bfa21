"""What routes need, as `Annotated` dependencies that tests can override."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from gateway.admission.admit import Admission
from gateway.admission.clients import Client, ClientResolver
from gateway.admission.prompt_limits import PromptLimits
from gateway.admission.refusals import RefusalCache
from gateway.jobs.records import JobFactory
from gateway.streams.hub import StreamHub
from shared.errors import AdminKeyRequired, MlxqError
from shared.models import ModelRegistry
from shared.settings import Settings


@dataclass(frozen=True)
class Gateway:
    """What the submitting routes share, built once when the app starts."""

    settings: Settings
    limits: PromptLimits
    admission: Admission
    queues: dict[str, Queue]
    """By priority: interactive, normal, low."""
    refusals: RefusalCache
    jobs: dict[str, JobFactory]
    """A job template per priority (each queue's jobs differ in their origin)."""
    pull_missing: Callable[[str], None]
    """Starts the pull of a hub model not yet here, by name (its jobs then wait for it)."""


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


async def get_async_redis(request: Request) -> AsyncRedis:
    redis: AsyncRedis = request.app.state.aredis
    return redis


async def get_models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


async def get_client(request: Request) -> Client:
    """Authenticates the request (when API keys are configured) and names its client."""
    resolver: ClientResolver = request.app.state.clients
    client = resolver.resolve(request)
    request.state.client = client  # named in the log line of a refusal
    return client


async def require_admin(request: Request) -> Client:
    """The client, if it may call admin routes: with an admin key, or anyone while no keys are set."""
    resolver: ClientResolver = request.app.state.clients
    client = resolver.resolve(request)
    if resolver.auth_required and not client.admin:
        raise AdminKeyRequired("This route needs one of MLXQ_ADMIN_KEYS; an ordinary API key is not enough")
    return client


def sees_everything(request: Request) -> bool:
    """Whether the request may see every client's jobs: an admin key, or anyone while no keys are set
    (an open route asks this of a request that may carry no key at all)."""
    resolver: ClientResolver = request.app.state.clients
    if not resolver.auth_required:
        return True
    try:
        return resolver.resolve(request).admin
    except MlxqError:
        return False


async def get_gateway(request: Request) -> Gateway:
    """Everything the submitting routes use, as one dependency: each one costs FastAPI time per request."""
    gateway: Gateway = request.app.state.gateway
    return gateway


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[AsyncRedis, Depends(get_async_redis)]


async def get_streams(request: Request) -> StreamHub:
    # async, as every dependency here: FastAPI runs a plain function on its thread pool, a hop per stream opened.
    streams: StreamHub = request.app.state.streams
    return streams


StreamsDep = Annotated[StreamHub, Depends(get_streams)]
"""The gateway's one reader of job streams."""
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
ClientDep = Annotated[Client, Depends(get_client)]
GatewayDep = Annotated[Gateway, Depends(get_gateway)]
AdminDep = Annotated[Client, Depends(require_admin)]
