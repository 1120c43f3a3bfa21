"""Batches of vectors sized by time at the embedding model's own speed, a job's encoding counted in its first
turn (worker/embedding_runs.py)."""

from __future__ import annotations

from pathlib import Path

from shared.embeddings import EmbedRequest
from shared.models import ModelSpec
from shared.settings import Settings
from worker.demo_model import build_embedding_model
from worker.embedding import EMBED_BATCH_TOKENS, EmbedWork
from worker.embedding_runs import FIRST_BATCH_TOKENS, EmbedPace, Embeds
from worker.kv_manager import KVCacheManager
from worker.ledger import MemoryLedger
from worker.model_cache import ModelCache


def test_with_no_stream_waiting_a_batch_is_as_large_as_a_batch_goes() -> None:
    assert EmbedPace().tokens("bge", None) == EMBED_BATCH_TOKENS


def test_a_batch_beside_streams_takes_the_budget_at_the_models_measured_speed() -> None:
    pace = EmbedPace()
    assert pace.tokens("bge", 0.02) == FIRST_BATCH_TOKENS  # nothing measured of this model yet
    pace.measured(tokens=640, seconds=0.1)  # 6,400 padded tokens a second
    assert pace.tokens("bge", 0.02) == 128
    assert pace.tokens("bge", 0.0) == FIRST_BATCH_TOKENS  # no gap of the streams measured yet
    assert pace.tokens("bge", 1e-6) == 1  # one input at least is the batch's business: never 0 tokens


def test_another_embedding_model_starts_from_nothing_measured() -> None:
    pace = EmbedPace()
    pace.tokens("bge", 0.02)
    pace.measured(tokens=640, seconds=0.1)
    assert pace.tokens("e5", 0.02) == FIRST_BATCH_TOKENS


def test_a_jobs_first_turn_beside_streams_encodes_and_leaves_its_vectors_to_the_next_when_that_took_the_budget(
    tmp_path: Path,
) -> None:
    """The first turn of a job encodes its inputs: that is the turn's time too, so the batch beside it gets what
    is left of the budget. With none left, the turn ends after the encoding, and the vectors come next turn."""
    spec = ModelSpec("embed", path=build_embedding_model(tmp_path / "embed"))
    cache = ModelCache(Settings(), MemoryLedger(10**10, KVCacheManager(0)), lambda: 40.0)
    embeds = Embeds(cache, lambda _: None)
    request = EmbedRequest(model="embed", inputs=[f"sentence number {n} of the test" for n in range(8)])
    embeds.add(EmbedWork("loads-the-model", request, spec))
    assert embeds.piece(1e-9) == []  # a load takes any budget a stream leaves
    while embeds.piece(None) != ["loads-the-model"]:
        pass
    work = EmbedWork("job-1", request, spec)
    embeds.add(work)
    assert embeds.piece(1e-9) == []
    assert len(work.ids) == 8 and work.vectors == [None] * 8  # encoded, nothing computed beside the streams
    assert embeds.piece(1e-9) == []
    assert 1 <= sum(v is not None for v in work.vectors) < 8  # a first, small batch: one input at least
    while embeds.piece(None) != ["job-1"]:  # no stream waits: batches as large as they go
        pass
    assert work.wait(0) and work.error is None and all(v is not None for v in work.vectors)

    # With no stream waiting, a job's first turn encodes and computes as in one.
    other = EmbedWork("job-2", request, spec)
    embeds.add(other)
    assert embeds.piece(None) == ["job-2"] and all(v is not None for v in other.vectors)
