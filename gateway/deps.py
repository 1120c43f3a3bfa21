"""What routes need, as `Annotated` dependencies that tests can override."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from shared.models import ModelRegistry
from shared.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


def get_models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]


def get_queue(settings: SettingsDep, redis: RedisDep) -> Queue:
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


QueueDep = Annotated[Queue, Depends(get_queue)]
