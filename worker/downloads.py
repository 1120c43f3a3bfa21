"""The worker's download thread: pulls of hub models, done beside generation, never inside it.

Every second it looks for a pull it may take (shared/pulls.py: a queued one, or
one whose worker died) and runs it: first the fit check against this worker's
model budget and disk, from the hub's file metadata (no byte fetched for a model
that cannot fit), then the download (shared/hub.py), which resumes each partial file.
A second thread writes the bytes on disk as progress, and with it the sign of
life that keeps other workers from taking the pull over. One pull at a time: a
download is limited by the network, not by this machine.
"""

from __future__ import annotations

import json
import logging
import threading

from redis import Redis

from shared import hub, keys, pulls
from shared.outage import REDIS, UNREACHABLE

logger = logging.getLogger(__name__)

ATTEMPTS = 5
"""Tries of one download (a network hiccup) before the pull fails; each resumes the last."""


class Downloads:
    def __init__(self, connection: Redis, worker_name: str, budget_bytes: int) -> None:
        self.connection = connection
        self.worker_name = worker_name
        self.budget_bytes = budget_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlxq-downloads", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(pulls.BEAT_S):
            try:
                self.take_one()
            except UNREACHABLE as exc:
                REDIS.failed("looking for downloads", exc)
            except Exception:
                logger.exception("download thread tick failed")

    def take_one(self) -> bool:
        """Run one pull this worker may take, if there is one; True when it ran one."""
        for raw in sorted(self.connection.smembers(keys.PULLING)):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if pulls.claim(self.connection, name, self.worker_name):
                record = pulls.read(self.connection, name)
                if record is not None:
                    self._run(record)
                    return True
        return False

    def _run(self, record: dict[str, object]) -> None:
        name, repo = str(record["name"]), str(record["repo"])
        revision = str(record.get("revision") or "") or None
        logger.info("pulling %s as model %s", repo, name)
        beating = threading.Event()
        beater = threading.Thread(target=self._beat, args=(name, repo, beating), name="mlxq-download-beat", daemon=True)
        beater.start()
        try:
            plan = hub.plan(repo, revision)
            problem = hub.fit_problem(plan, self.budget_bytes)
            if problem is not None:
                raise hub.HubError(problem)
            self.connection.hset(keys.pull(name), "total_bytes", plan.total_bytes)
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    hub.download(plan, stop=beating.is_set)
                    break
                except hub.HubError as exc:  # each attempt goes on from the bytes already here
                    if exc.kind == "stopped" or attempt == ATTEMPTS or self._stop.wait(2.0 * attempt):
                        raise
                    logger.warning("pull of %s: attempt %d failed, trying again: %s", repo, attempt, exc)
        except hub.HubError as exc:
            beating.set()
            logger.warning("pull of %s failed: %s", repo, exc)
            pulls.fail(self.connection, name, self.worker_name, str(exc))
            return
        except Exception as exc:
            beating.set()
            logger.exception("pull of %s failed", repo)
            pulls.fail(self.connection, name, self.worker_name, f"{type(exc).__name__}: {exc}")
            return
        beating.set()
        beater.join()
        entry = json.loads(str(record.get("entry") or "{}")) or {"pulled": True}
        if pulls.finish(self.connection, name, self.worker_name, entry, hub.bytes_here(repo)):
            logger.info("pulled %s as model %s", repo, name)
        else:
            logger.info("pull of %s done, but model %s was removed or taken over meanwhile", repo, name)

    def _beat(self, name: str, repo: str, done: threading.Event) -> None:
        """Progress and sign of life each second; a pull no longer this worker's is stopped (`done`)."""
        while not done.wait(pulls.BEAT_S):
            try:
                if not pulls.progress(self.connection, name, self.worker_name, hub.bytes_here(repo)):
                    logger.info("pull of %s is no longer this worker's; stopping it", repo)
                    done.set()
            except UNREACHABLE as exc:
                REDIS.failed("writing a download's progress", exc)
