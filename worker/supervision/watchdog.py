"""The watchdog: `python -m worker.watchdog` keeps N worker processes alive.

It starts each worker under a fresh name, watches it (its process, its
heartbeat key, its engine's progress) and replaces it when it dies or hangs,
after a backoff. Failed starts feed a circuit breaker kept in Redis, which the
gateway reads to refuse work while no worker can start. Jobs a dead worker held
go back to the front of their queue at once (worker/supervision/orphans.py). SIGTERM stops
the workers gracefully: they hand back what they run and exit, or are killed
after the grace period.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

import psutil
from redis import Redis
from rq import Queue

from shared import batch_progress, circuit, events, keys, stats
from shared.circuit import CircuitRecord, CircuitState
from shared.json_bytes import JobSerializer
from shared.logs import configure_logging
from shared.outage import REDIS, UNREACHABLE, quietly
from shared.settings import Settings
from shared.text import text
from worker.supervision.orphans import forget_worker, prune_canceled, reclaim_claimed, reclaim_jobs
from worker.supervision.restart_policy import RestartPolicy

logger = logging.getLogger(__name__)


@dataclass
class Slot:
    """One of the N worker processes the watchdog keeps running."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    name: str = ""
    started_at: float = 0.0
    ready_at: float | None = None
    failures: int = 0
    """Consecutive deaths, hangs and failed starts; reset once a worker stays healthy."""
    next_start_at: float = 0.0
    probe_failures: int = 0
    next_probe_at: float = 0.0
    kill_at: float | None = None
    """While stopping a worker: when SIGTERM's grace runs out and SIGKILL follows."""
    hung: str | None = None
    starts: int = 0
    held: tuple[str, ...] = ()
    """The models its last worker held when it died: the next one loads them again before their requests (a
    session's next turn after a crash waits for its prefix from disk, not for the model too)."""


class Watchdog:
    def __init__(self, settings: Settings, redis: Redis, command: list[str] | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.command = command or [sys.executable, "-m", "worker"]
        self.policy = RestartPolicy(settings)
        self.queues = [Queue(name, connection=redis, serializer=JobSerializer) for name in settings.queue_names]
        self.slots = [Slot(i) for i in range(settings.workers)]
        self.stopping = False
        self.host = socket.gethostname()
        self.next_sweep_at = 0.0

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        logger.info("watchdog supervising %d worker(s)", len(self.slots))
        reclaimed = False
        while not self.stopping:
            # Redis away is weather: nothing here exits for it. Workers keep running; dead ones are
            # noticed, reclaimed and restarted once it is back (a tick needs it from its first step).
            try:
                if not reclaimed:
                    self.reclaim_from_dead_workers()
                    reclaimed = True
                self.tick()
                REDIS.ok()
            except UNREACHABLE as exc:
                REDIS.failed("supervising workers", exc)
            time.sleep(self.settings.watchdog_tick_s)
        self.shutdown()

    def tick(self) -> None:
        # A write first: a Redis that answers reads but refuses writes (a full disk, a replica) is an
        # outage here too, and a worker whose heartbeat could not be written is not taken for hung.
        self.redis.set(keys.HEALTH_PROBE, "1", px=10_000)
        REDIS.ok()  # now, before any heartbeat is judged: one that expired meanwhile gets its grace
        record = self._circuit_now()
        for slot in self.slots:
            if slot.process is None:
                self._maybe_start(slot, record)
            else:
                self._check(slot)
        if time.monotonic() >= self.next_sweep_at:
            self.next_sweep_at = time.monotonic() + self.settings.batch_sweep_interval_s
            # Ends nobody recorded (an expired child, a process killed between two writes) would
            # otherwise hold a batch's synthesis forever.
            batch_progress.sweep_open(self.redis, self.settings.stream_ttl_s)
            prune_canceled(self.redis, self.settings.queue_names, self.settings.failure_ttl_s)

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("watchdog got %s: stopping workers", signal.Signals(signum).name)
        self.stopping = True

    # -- starting ------------------------------------------------------------------------

    def _circuit_now(self) -> CircuitRecord:
        record = circuit.read(self.redis)
        if record.trial_due(circuit.redis_now_ms(self.redis)):
            record = CircuitRecord(
                CircuitState.HALF_OPEN, record.failures, record.opened_at_ms, record.next_trial_at_ms
            )
            circuit.write(self.redis, record)
            events.emit(self.redis, "circuit_half_open", failures=record.failures)
            logger.info("circuit half-open: one trial start")
        return record

    def _maybe_start(self, slot: Slot, record: CircuitRecord) -> None:
        now = time.monotonic()
        if record.state == CircuitState.OPEN or now < slot.next_start_at:
            return
        if record.state == CircuitState.HALF_OPEN and any(s.process and s.ready_at is None for s in self.slots):
            return  # one trial at a time
        restart = slot.starts > 0
        if restart:
            allowed = self.policy.earliest(now)
            if allowed > now:
                slot.next_start_at = allowed
                logger.warning("restart limit reached; next start in %.0f s", allowed - now)
                return
            self.policy.record(now)
        slot.name = f"mlxq-{self.host}-{slot.index}-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "MLXQ_WORKER_NAME": slot.name, "MLXQ_WATCHDOG_PID": str(os.getpid())}
        if slot.held:
            env["MLXQ_RELOAD_MODELS"] = ",".join(slot.held)
            slot.held = ()
        # Its own session: a Ctrl-C in the terminal reaches the watchdog, which stops the workers in order.
        slot.process = subprocess.Popen(self.command, env=env, start_new_session=True)
        slot.started_at = now
        slot.ready_at = None
        slot.probe_failures = 0
        slot.kill_at = None
        slot.hung = None
        slot.starts += 1
        events.emit(self.redis, "worker_started", worker=slot.name, pid=slot.process.pid, slot=slot.index)
        if restart:
            events.emit(self.redis, "worker_restarted", worker=slot.name, slot=slot.index, failures=slot.failures)
            stats.count(self.redis, keys.STATS_COUNTERS, "worker_restarts")
        logger.info("started worker %s (pid %d)", slot.name, slot.process.pid)

    # -- watching --------------------------------------------------------------------------

    def _check(self, slot: Slot) -> None:
        assert slot.process is not None
        now = time.monotonic()
        code = slot.process.poll()
        if code is not None:
            self._on_exit(slot, code)
            return
        if slot.kill_at is not None:
            if now >= slot.kill_at:
                logger.warning("worker %s ignored SIGTERM; SIGKILL", slot.name)
                slot.process.kill()
            return
        beat = self._heartbeat(slot.name)
        if slot.ready_at is None:
            if beat is not None:
                self._on_ready(slot)
            elif now - slot.started_at > self.settings.watchdog_start_timeout_s:
                self._hang(slot, f"not ready {self.settings.watchdog_start_timeout_s:.0f} s after start")
            return
        if beat is None:
            ttl_s = self.settings.heartbeat_ttl_s
            if time.monotonic() - REDIS.back_at < ttl_s:
                return  # it expired while Redis was away: the worker gets a heartbeat TTL to beat again
            if int(self.redis.info("server").get("uptime_in_seconds", ttl_s)) < ttl_s:
                return  # Redis restarted (empty, or between two of our ticks): the same grace
            self._hang(slot, f"heartbeat silent for more than {self.settings.heartbeat_ttl_s} s")
            return
        if now >= slot.next_probe_at:
            slot.next_probe_at = now + self.settings.watchdog_probe_interval_s
            problem = self._probe(beat)
            slot.probe_failures = slot.probe_failures + 1 if problem else 0
            if problem and slot.probe_failures >= self.settings.watchdog_probe_failures:
                self._hang(slot, f"{slot.probe_failures} failed probes in a row: {problem}")
                return
        if slot.failures and now - slot.ready_at >= self.settings.healthy_reset_s:
            slot.failures = 0

    def _heartbeat(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.worker_heartbeat(name))
        return json.loads(raw) if raw else None

    def _probe(self, beat: dict[str, Any]) -> str | None:
        """Why the worker looks stuck, or None. Its monitor thread may beat while the engine hangs."""
        if not beat.get("engine_alive", True):
            return "the engine thread has died"
        stalled = float(beat.get("progress_age_s", 0.0))
        limit = (
            self.settings.watchdog_load_timeout_s
            if beat.get("engine_state") == "loading"
            else self.settings.watchdog_probe_interval_s
        )
        if stalled > limit:
            return f"the engine has made no progress for {stalled:.0f} s while {beat.get('engine_state', 'idle')}"
        return None

    def _on_ready(self, slot: Slot) -> None:
        slot.ready_at = time.monotonic()
        slot.next_probe_at = slot.ready_at + self.settings.watchdog_probe_interval_s
        events.emit(self.redis, "worker_ready", worker=slot.name, startup_s=round(slot.ready_at - slot.started_at, 2))
        record = circuit.read(self.redis)
        if record != CircuitRecord():
            circuit.write(self.redis, record.after_ready())
            if record.state != CircuitState.CLOSED:
                events.emit(self.redis, "circuit_closed", worker=slot.name)
                logger.info("circuit closed: worker %s is ready", slot.name)
        logger.info("worker %s ready", slot.name)

    def _hang(self, slot: Slot, reason: str) -> None:
        assert slot.process is not None
        slot.hung = reason
        events.emit(self.redis, "worker_hung", worker=slot.name, reason=reason)
        logger.warning("worker %s hung: %s; SIGTERM", slot.name, reason)
        self._terminate(slot)

    def _terminate(self, slot: Slot) -> None:
        assert slot.process is not None
        if slot.kill_at is None:
            if _stopped(slot.process.pid):
                # SIGSTOPped (state T): a SIGTERM would wait in its queue the whole grace period.
                logger.warning("worker %s is stopped; SIGKILL at once", slot.name)
                slot.kill_at = time.monotonic()
                slot.process.kill()
                return
            try:
                slot.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            slot.kill_at = time.monotonic() + self.settings.stop_grace_s

    def _on_exit(self, slot: Slot, code: int) -> None:
        assert slot.process is not None
        failed_start = slot.ready_at is None
        exit_code, by_signal = (None, signal.Signals(-code).name) if code < 0 else (code, None)
        beat = None if failed_start else self._heartbeat(slot.name)
        # Models it had loaded, not one it was loading (that load may be what killed it).
        slot.held = tuple(m["name"] for m in (beat or {}).get("models", []) if m.get("state") == "loaded")
        reclaimed = self.forget(slot.name)
        slot.process = None
        if self.stopping:
            events.emit(
                self.redis, "worker_died", worker=slot.name, exit_code=exit_code, signal=by_signal, stopping=True
            )
            return
        slot.failures += 1
        delay = self.policy.delay(slot.failures)
        slot.next_start_at = time.monotonic() + delay
        events.emit(
            self.redis,
            "worker_died",
            worker=slot.name,
            exit_code=exit_code,
            signal=by_signal,
            before_ready=failed_start,
            hung=slot.hung,
            requeued=[r.job_id for r in reclaimed if not r.quarantined],
            quarantined=[r.job_id for r in reclaimed if r.quarantined],
            restart_in_s=delay,
        )
        logger.warning(
            "worker %s exited (code %s, signal %s)%s; restart in %.1f s",
            slot.name,
            exit_code,
            by_signal,
            " before it was ready" if failed_start else "",
            delay,
        )
        if failed_start:
            self._count_failed_start()

    def _reaped(self, slot: Slot, code: int) -> bool:
        self._on_exit(slot, code)
        return True

    def _count_failed_start(self) -> None:
        record = circuit.read(self.redis)
        now_ms = circuit.redis_now_ms(self.redis)
        after = record.after_failed_start(
            now_ms, self.settings.circuit_failure_threshold, int(self.settings.circuit_open_s * 1000)
        )
        circuit.write(self.redis, after)
        if after.state == CircuitState.OPEN and record.state != CircuitState.OPEN:
            events.emit(self.redis, "circuit_opened", failures=after.failures, retry_at_ms=after.next_trial_at_ms)
            logger.error(
                "circuit open after %d failed starts; next trial in %.0f s",
                after.failures,
                self.settings.circuit_open_s,
            )

    # -- dead workers' leftovers ------------------------------------------------------------------

    def forget(self, worker_name: str) -> list[Any]:
        """Requeue a dead worker's jobs and clean its records."""
        reclaimed = reclaim_jobs(
            self.redis, worker_name, self.queues, self.settings.max_crash_attempts, self.settings.stream_ttl_s
        )
        reclaimed += reclaim_claimed(self.redis, worker_name, self.settings.stream_ttl_s)
        forget_worker(self.redis, worker_name)
        return reclaimed

    def reclaim_from_dead_workers(self) -> None:
        """At start-up: jobs left started by workers that are gone (a previous watchdog's, say)."""
        holders = {text(name) for name in self.redis.smembers(keys.CLAIMING_WORKERS)}
        for queue in self.queues:
            for job in queue.started_job_registry.get_job_ids():
                fetched = queue.fetch_job(job)
                if fetched is not None and fetched.worker_name:
                    holders.add(fetched.worker_name)
        for name in holders:
            if not self.redis.exists(keys.worker_heartbeat(name)):
                logger.warning("worker %s is gone but holds jobs; reclaiming them", name)
                self.forget(name)

    # -- stopping --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after the grace period, reclaim their jobs."""
        running = [s for s in self.slots if s.process is not None]
        for slot in running:
            self._terminate(slot)
        deadline = time.monotonic() + self.settings.stop_grace_s
        while any(s.process is not None for s in running):
            for slot in running:
                if slot.process is None:
                    continue
                code = slot.process.poll()
                if code is None and time.monotonic() >= deadline:
                    logger.warning(
                        "worker %s still running after %.0f s; SIGKILL", slot.name, self.settings.stop_grace_s
                    )
                    slot.process.kill()
                    code = slot.process.wait()
                if (
                    code is not None
                    and quietly("reclaiming a stopped worker's jobs", partial(self._reaped, slot, code)) is None
                ):
                    # Redis is away: the next watchdog reclaims what this worker held (it has no heartbeat).
                    slot.process = None
            time.sleep(0.05)
        logger.info("watchdog stopped")


def _stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal or a tracer: it would not run a SIGTERM handler."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    redis = Redis.from_url(settings.redis_url)
    events.record_outages(redis, "watchdog")
    Watchdog(settings, redis).run()


if __name__ == "__main__":
    main()
