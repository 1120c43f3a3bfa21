"""What routes need, as `Annotated` dependencies that tests can override."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from gateway.admission import Admission
from gateway.clients import Client, ClientResolver
from gateway.prompt_limits import PromptLimits
from shared.models import ModelRegistry
from shared.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


def get_async_redis(request: Request) -> AsyncRedis:
    redis: AsyncRedis = request.app.state.aredis
    return redis


def get_models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


def get_queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def get_admission(request: Request) -> Admission:
    admission: Admission = request.app.state.admission
    return admission


def get_limits(request: Request) -> PromptLimits:
    limits: PromptLimits = request.app.state.limits
    return limits


def get_client(request: Request) -> Client:
    """Authenticates the request (when API keys are configured) and names its client."""
    resolver: ClientResolver = request.app.state.clients
    return resolver.resolve(request)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[AsyncRedis, Depends(get_async_redis)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
QueueDep = Annotated[Queue, Depends(get_queue)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
LimitsDep = Annotated[PromptLimits, Depends(get_limits)]
ClientDep = Annotated[Client, Depends(get_client)]
