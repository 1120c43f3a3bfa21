"""Model affinity from the worker's side: which model it runs, and whether it may swap yet.

The claim script (worker/claim.lua) decides with what `preference()` tells it;
the worker notes each job it claims, and a claim for another model is a swap
(at most one per MLXQ_SWAP_AFTER_S, a `model_swap` event each).
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from rq.job import Job

from shared import events
from shared.outage import quietly
from worker.claiming import Preference

logger = logging.getLogger(__name__)


class ModelAffinity:
    """The model of the last job claimed (what the batch runs, or will once it has drained)."""

    def __init__(self, connection: Redis, worker: str, swap_after_s: float) -> None:
        self.connection = connection
        self.worker = worker
        self.swap_after_s = swap_after_s
        self.model: str | None = None
        self._swapped_at = -float("inf")

    def preference(self, busy: bool) -> Preference:
        return Preference(
            model=self.model or "",
            busy=busy,
            may_swap=time.monotonic() - self._swapped_at >= self.swap_after_s,
            swap_after_s=self.swap_after_s,
        )

    def claimed(self, job: Job) -> None:
        """A job was claimed: a swap when it is for another model than the last one (an embedding or rerank
        job, which runs beside any generation, is none)."""
        model = job.meta.get("model")
        if not isinstance(model, str) or model == self.model or job.meta.get("kind"):
            return
        previous = self.model
        self.model = model
        if previous is None:
            return
        self._swapped_at = time.monotonic()
        logger.info("swapping model %s -> %s", previous, model, extra={"job_id": job.id})
        quietly(
            "emitting an event",
            lambda: events.emit(self.connection, "model_swap", worker=self.worker, previous=previous, model=model),
        )
