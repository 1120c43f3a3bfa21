"""The engine's embedding jobs: one batch of vectors per engine turn, between decode steps.

Runs only on the engine thread (worker/engine.py). The first job in line holds
its model (loaded by the model cache like any other, under the same ledger) from
its first batch to its last; a job canceled or failed lets go at once. Beside
running streams a batch takes no longer than a piece of prefill may
(worker/prefill_pace.py), at the embedding model's own measured speed: its cost
per token is not the chat model's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import InvalidRequest, MlxqError
from worker import embedding, reranking
from worker.embedding import EMBED_BATCH_TOKENS, EmbedWork
from worker.model_cache import LoadedModel, ModelCache
from worker.prefill_pace import KEEP

FIRST_BATCH_TOKENS = 64
"""A batch beside running streams before this model's speed was measured: small, so that it is soon."""


@dataclass
class EmbedPace:
    """The padded tokens per second of the embedding model being run, from its own batches."""

    _tokens: float = 0.0
    _seconds: float = 0.0
    _model: str = ""

    def tokens(self, model: str, budget_s: float | None) -> int:
        """Padded tokens of `model`'s next batch: as many as take `budget_s`, or a full batch with no
        budget (no stream waits)."""
        if model != self._model:
            self._tokens, self._seconds, self._model = 0.0, 0.0, model
        if budget_s is None:
            return EMBED_BATCH_TOKENS
        if self._seconds <= 0 or budget_s <= 0:  # nothing measured yet, of the model or of the streams
            return FIRST_BATCH_TOKENS
        return max(1, round(self._tokens / self._seconds * budget_s))

    def measured(self, tokens: int, seconds: float) -> None:
        """A batch of `tokens` (padded) took `seconds`: a running mean weighted by time, as the prefill's."""
        if seconds > 0:
            self._tokens = KEEP * self._tokens + tokens
            self._seconds = KEEP * self._seconds + seconds


class Embeds:
    def __init__(self, cache: ModelCache, on_progress: Callable[[str | None], None]) -> None:
        self.cache = cache
        self._progress = on_progress
        self._line: deque[EmbedWork] = deque()
        self._held: LoadedModel | None = None
        """The first job's model, once acquired."""
        self._pad = 0
        self._judge: reranking.Judge | None = None
        """An LLM reranker's "yes" and "no" tokens."""
        self.pace = EmbedPace()

    @property
    def waiting(self) -> bool:
        return bool(self._line)

    def add(self, work: EmbedWork) -> None:
        self._line.append(work)

    def piece(self, budget_s: float | None) -> list[str]:
        """One batch of the first job in line, taking about `budget_s` (one input at least; as large as a
        batch goes when None); the ids of the jobs that ended."""
        if not self._line:
            return []
        work = self._line[0]
        try:
            work.stop_if_canceled()
            if self._held is None:
                began = time.perf_counter()
                self._held = self._acquire(work)
                if budget_s is not None:
                    # A job's first turn also encodes its inputs (and may load its model): the batch beside
                    # that gets what is left of the budget, none when they took all of it (a batch of the
                    # pace's size after the encoding overran the budget by a third at each job's start).
                    budget_s -= time.perf_counter() - began
                    if budget_s <= 0:
                        self._progress(None)
                        return []
            # The pace counts all that the turn waits for after the encoding: the forward, and the vectors
            # handed over after it (the forward's time alone made every batch beside streams overrun).
            began = time.perf_counter()
            batch = work.next_batch(self.pace.tokens(work.spec.name, budget_s))
            rows = [work.ids[i] for i in batch]
            if work.judged:
                assert self._judge is not None
                vectors = reranking.forward(self._held.model, rows, self._judge)
            else:
                vectors = embedding.forward(self._held.model, rows, self._pad)
                work.check_width(len(vectors[0]))
            for index, vector in zip(batch, vectors, strict=True):
                work.vectors[index] = vector
            self.pace.measured(len(rows) * max(map(len, rows)), time.perf_counter() - began)
            self._progress(None)
        except Exception as exc:
            self._end(work, self._translated(exc, work.job_id))
            return [work.job_id]
        if work.remaining:
            return []
        self._end(work, None)
        return [work.job_id]

    def _acquire(self, work: EmbedWork) -> LoadedModel:
        self._progress("loading")
        try:
            loaded, work.load_s = self.cache.acquire(work.spec, 0, work.request.keep_alive)
        finally:
            self._progress(None)
        self._held = loaded
        if loaded.kind == "rerank" and work.request.kind == "rerank":
            self._judge = reranking.judge(loaded.model, loaded.tokenizer)
            work.encode_judged(loaded.tokenizer, loaded.context_tokens or reranking.DEFAULT_CONTEXT)
            return loaded
        if loaded.kind != "embed":
            raise InvalidRequest(
                f"Model '{work.spec.name}' generates text; it is not an embedding model", param="model"
            )
        self._pad = embedding.pad_id(loaded.tokenizer)
        work.encode(loaded.tokenizer, embedding.max_tokens(loaded.model), embedding.vocabulary(loaded.model))
        return loaded

    def _end(self, work: EmbedWork, error: BaseException | None) -> None:
        self._line.popleft()
        if self._held is not None:
            self.cache.release(work.spec.name)
            self._held = None
        work.finish(error)

    def end_everything(self, error: MlxqError) -> None:
        while self._line:
            self._end(self._line[0], error)

    def _translated(self, exc: BaseException, job_id: str) -> BaseException:
        return self.cache.failure(exc, job_id, "embedding", "Embedding")
