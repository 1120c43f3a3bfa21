"""Batches of vectors sized by time at the embedding model's own speed (worker/embedding_runs.py)."""

from __future__ import annotations

from worker.embedding import EMBED_BATCH_TOKENS
from worker.embedding_runs import FIRST_BATCH_TOKENS, EmbedPace


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
