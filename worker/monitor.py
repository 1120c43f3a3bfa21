"""The worker's monitor thread: what must happen while every other thread is busy with jobs.

Every `MLXQ_CANCEL_POLL_INTERVAL_S` it honours cancel flags (the engine stops that
generation between tokens), takes commands sent to this worker (unload a model),
and shuts the worker down if its watchdog is gone; every heartbeat interval it
writes the worker's heartbeat, which supervision, `/health` and the claim script
read. A Redis outage costs ticks, never the thread.

A job's start is told in the heartbeat at once (`poke`), but here, not on the
thread that claims jobs: a burst of claims is not held up by a beat per job, and
the pokes that come during one beat make one more.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from redis import Redis

from shared import keys, memory
from shared.outage import REDIS, UNREACHABLE
from shared.settings import Settings
from worker.engine import Engine
from worker.kv_manager import KVCacheManager

POKE_GATHER_S = 0.025
"""How long a poke's beat waits for more: a burst of eight claims or ends poked a beat each, ten in 18 ms beside the
burst's starts and first tokens (beats held the GIL 12 % of the worker's time with it, py-spy over bursts of eight,
some 5 ms a burst); one after them says the same a moment later."""

logger = logging.getLogger(__name__)


class Monitor:
    def __init__(
        self,
        connection: Redis,
        name: str,
        settings: Settings,
        engine: Engine,
        canceled: set[str],
        running: Callable[[], list[str]],
        registered: Callable[[], None] = lambda: None,
    ) -> None:
        self.connection = connection
        self.running = running
        self.registered = registered
        """Called with each beat: RQ's record of the worker is written again if Redis lost it."""
        """The ids of the jobs the worker holds (claimed and started, in the engine or about to be)."""
        self.name = name
        self.settings = settings
        self.engine = engine
        self._canceled = canceled
        """Shared with the worker: jobs asked to stop, which end as canceled."""
        self._orphaned = False
        self._stopping = False
        self._wake = threading.Event()
        """Set by a poke or a stop: the loop's wait ends early."""
        self._poked = False
        self._poked_at = 0.0
        """When the first poke not yet beaten came (time.monotonic())."""
        self._beating = threading.Lock()
        """Beats come from several threads: each one's record is whole and the last written is the newest."""
        self._beat_began = float("-inf")
        """When the last heartbeat written began to look (time.monotonic())."""
        self._thread = threading.Thread(target=self._loop, name="mlxq-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def poke(self) -> None:
        """Beat soon, on the monitor's thread: a job started or ended."""
        if not self._poked:
            self._poked_at = time.monotonic()
            self._poked = True
        self._wake.set()

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.settings.heartbeat_interval_s
        next_tick = time.monotonic()
        while True:
            due = min(next_tick, self._poked_at + POKE_GATHER_S) if self._poked else next_tick
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._poked and time.monotonic() >= self._poked_at + POKE_GATHER_S:
                    self._poked = False
                    self.beat()
                if time.monotonic() < next_tick:
                    continue  # a poke: the cancel flags are not due yet
                next_tick = time.monotonic() + self.settings.cancel_poll_interval_s
                self._watch_parent()
                self._honour_cancel_flags()
                self._take_commands()
                if time.monotonic() >= next_beat:
                    self.registered()
                    self.beat()
                    next_beat = time.monotonic() + self.settings.heartbeat_interval_s
                REDIS.ok()
            except UNREACHABLE as exc:
                REDIS.failed("watching cancel flags and beating", exc)  # the next tick tries again
            except Exception:
                logger.exception("worker monitor tick failed")

    def _honour_cancel_flags(self) -> None:
        job_ids = self.engine.active_job_ids()
        if not job_ids:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(keys.job_cancel(job_id))
            flags = pipe.execute()
        for job_id, flagged in zip(job_ids, flags, strict=True):
            if flagged and job_id not in self._canceled and self.engine.cancel(job_id):
                self._canceled.add(job_id)
                logger.info("canceling running job", extra={"job_id": job_id})

    def _watch_parent(self) -> None:
        """A worker whose watchdog is gone shuts down (handing back its job) rather than run unsupervised."""
        expected = self.settings.watchdog_pid
        if expected is not None and os.getppid() != expected and not self._orphaned:
            self._orphaned = True
            logger.warning("watchdog %d is gone; shutting down", expected)
            os.kill(os.getpid(), signal.SIGTERM)

    def _take_commands(self) -> None:
        raw = self.connection.lpop(keys.worker_commands(self.name), 16)
        for item in raw if isinstance(raw, list) else []:
            command = json.loads(item)
            model = command.get("model")
            if command.get("command") == "unload" and isinstance(model, str):
                logger.info("asked to unload model %s", model)
                self.engine.request_unload(model)
            elif command.get("command") == "load" and isinstance(model, str):
                registry = self.engine.cache.registry
                spec = registry.find(model) if registry is not None else None
                if spec is None:
                    logger.warning("asked to load model %s, which is not in the registry here", model)
                else:
                    logger.info("asked to load model %s", model)
                    self.engine.request_load(spec)
            else:
                logger.warning("ignoring unknown worker command %r", command)

    def beat(self) -> None:
        """Write the heartbeat as things are now, or see one written that began after this call: jobs that
        end together (each wants its model's state shown before its answer) share one beat."""
        asked = time.monotonic()
        with self._beating:
            if self._beat_began > asked:
                return
            began = time.monotonic()
            self._beat()
            self._beat_began = began  # a beat that failed covers nobody

    def _beat(self) -> None:
        snapshot = memory.snapshot(self.settings)
        active = self.running()
        ledger = self.engine.cache.ledger
        record = {
            "name": self.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": "busy" if active else "idle",
            "jobs": active,
            "engine_alive": self.engine.alive,
            "engine_state": self.engine.state,
            "progress_age_s": round(time.monotonic() - self.engine.progress_at, 2),
            "models": self.engine.cache.snapshot(),
            "model_budget_bytes": ledger.budget_bytes,
            "model_held_bytes": ledger.held_bytes,
            "kv_cache_bytes": ledger.kv_bytes,
            "prefix_cache_bytes": ledger.kept_bytes,
            **prefix_tiers(self.engine.runner.kv),
            "batch_limit": self.engine.batch_limit,
            "tokens_generated": self.engine.runner.tokens_generated,
            "memory": snapshot,
            "at": time.time(),
        }
        self._publish(json.dumps(record))

    def _publish(self, record: str) -> None:
        """The heartbeat `record`, and the routing names of what this worker keeps for the claim script (all
        of them again when Redis lost the set: it came back empty), as long-lived as the heartbeat; in one
        round trip, since a beat comes before each answer."""
        held = self.engine.runner.kv.routes
        new, key, ttl = held.take_new(), keys.worker_prefixes(self.name), self.settings.heartbeat_ttl_s
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.set(keys.worker_heartbeat(self.name), record, ex=ttl)
                if new:
                    pipe.sadd(key, *new)
                pipe.expire(key, ttl)
                kept = pipe.execute()[-1]
        except BaseException:
            held.put_back(new)  # written at the next beat
            raise
        if not kept:
            every = held.all()
            if every:
                with self.connection.pipeline(transaction=False) as pipe:
                    pipe.sadd(key, *every)
                    pipe.expire(key, ttl)
                    pipe.execute()


def prefix_tiers(kv: KVCacheManager) -> dict[str, Any]:
    """What the kept prefixes' disk tier holds and how often each tier served a prompt's start."""
    disk = kv.disk
    return {
        "prefix_disk_bytes": disk.nbytes if disk is not None else 0,
        "prefix_disk_writing": disk is not None and disk.writing,
        "prefix_disk_queued": disk.queued if disk is not None else 0,
        "prefix_hits": asdict(kv.hits),
    }
