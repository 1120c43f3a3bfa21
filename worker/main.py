"""Entry point of one worker process: `python -m worker`."""

from __future__ import annotations

import logging
import os
import socket
import threading

import mlx.core as mx
from redis import Redis

from shared import events
from shared.json_bytes import JobSerializer
from shared.live_models import LiveModels
from shared.logs import configure_logging
from shared.models import ModelRegistry
from shared.settings import Settings
from shared.sizing import format_bytes
from worker import tasks
from worker.assembly import build_engine
from worker.claiming import TurnTakingQueue
from worker.demo_model import DEMO, EMBED, build_builtin
from worker.downloads import Downloads
from worker.engine import Engine
from worker.model_cache import device_memory_bytes
from worker.rq_worker import MlxqWorker
from worker.streaming import StreamPublisher

logger = logging.getLogger(__name__)


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    connection = Redis.from_url(settings.redis_url)
    events.record_outages(connection, "worker")
    live = LiveModels(settings, connection)
    models = live.registry
    for spec in models.all():
        problem = spec.problem()
        if problem:
            logger.warning("model will fail to load: %s", problem)
        elif spec.builtin and spec.path is not None:
            # Built now, so that gateways count its tokens (and show its shape) from the first request. The
            # demo and the embedding model take seconds, once: on threads of their own, so that the worker
            # serves meanwhile (a job for one waits for its build); the tiny model, well under a second,
            # before the worker serves.
            if spec.name in (DEMO, EMBED):
                threading.Thread(target=build_builtin, args=(spec.name, spec.path), name=f"build-{spec.name}").start()
            else:
                build_builtin(spec.name, spec.path)

    budget = settings.model_budget_bytes or int(device_memory_bytes() * settings.model_budget_fraction)
    logger.info("model budget: %s", format_bytes(budget))
    engine = build_engine(settings, budget, registry=models)
    engine.start()
    live.on_change = lambda: warm(engine, models)
    warm(engine, models)
    reload(engine, models, settings.reload_models)
    live.start()
    # Highest priority first: the first non-empty queue in this order gives the next job (the last one,
    # the batch tier, in turns by client).
    queues = [TurnTakingQueue(name, connection=connection, serializer=JobSerializer) for name in settings.queue_names]
    name = settings.worker_name or f"mlxq-{socket.gethostname()}-{os.getpid()}"
    publisher = StreamPublisher(connection)
    worker = MlxqWorker(queues, settings=settings, engine=engine, publisher=publisher, connection=connection, name=name)
    Downloads(connection, name, budget).start()
    tasks.bind(
        tasks.Runtime(
            engine=engine,
            models=models,
            settings=settings,
            keep_alive=worker.keep_alive,
            publisher=publisher,
            resumed=worker.stream_starts.take,
        )
    )
    try:
        worker.work(logging_level=settings.log_level, with_scheduler=False)
    finally:
        live.stop()
        engine.stop()
        mx.clear_streams()  # before interpreter teardown; see Engine._run


def warm(engine: Engine, models: ModelRegistry) -> None:
    """Models marked `warm` are loaded now (once no batch runs), before their first request."""
    loaded = set(engine.cache.loaded_names())
    for spec in models.all():
        if spec.warm and spec.name not in loaded and spec.problem() is None and spec.local_files() is not None:
            engine.request_load(spec)


def reload(engine: Engine, models: ModelRegistry, names: str) -> None:
    """The models the worker before this one held when it died (the watchdog says which), loaded again now."""
    for name in filter(None, names.split(",")):
        spec = models.find(name)
        if spec is not None and spec.problem() is None:
            logger.info("loading %s again: the worker before this one held it", name)
            engine.request_load(spec)


if __name__ == "__main__":
    main()
