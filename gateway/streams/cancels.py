"""Cancels that Redis could not take when they were asked for, kept until it can.

A client that hangs up mid-stream cancels its job (gateway/streams/waiting.py). If Redis
is away or refusing writes just then, a cancel that was dropped would let the
job run on to the end for nobody, and run again after a crash. Each is kept in
this gateway's memory and written once Redis takes writes again (a gateway that
dies meanwhile loses them: the job then runs to its end, as before).
"""

from __future__ import annotations

import logging
import threading

from redis import Redis

from gateway.jobs import records
from shared.errors import MlxqError
from shared.outage import REDIS, UNREACHABLE

logger = logging.getLogger(__name__)


class PendingCancels:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job_ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._job_ids)

    def cancel(self, job_id: str, redis: Redis, stream_ttl_s: int) -> bool:
        """Cancel the job now, or keep the cancel for when Redis takes it (False). One that has ended
        is left."""
        try:
            records.cancel(records.fetch(job_id, redis), redis, stream_ttl_s)
        except MlxqError:
            pass  # ended meanwhile, or gone
        except UNREACHABLE as exc:
            REDIS.failed("canceling the job of a client that went away", exc)
            with self._lock:
                self._job_ids.add(job_id)
            return False
        return True

    def flush(self, redis: Redis, stream_ttl_s: int) -> None:
        """Try the kept cancels again (any thread), until Redis refuses one: the rest wait for the next
        try. Whatever goes wrong, none is dropped."""
        with self._lock:
            waiting, self._job_ids = self._job_ids, set()
        left = list(waiting)
        try:
            while left and self.cancel(left[0], redis, stream_ttl_s):
                left.pop(0)
        except Exception:
            logger.exception("writing kept cancels failed")
        finally:
            with self._lock:
                self._job_ids.update(left)
        if waiting and not left:
            logger.info("wrote %d cancels kept through a Redis outage", len(waiting))
