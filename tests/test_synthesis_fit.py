"""A batch's synthesis prompt cut to fit its model's context (counted here in bytes, as without a
tokenizer): fair shares, the cuts marked, and a clear failure when nothing useful would fit."""

from __future__ import annotations

import json

import pytest
from redis import Redis
from rq import Queue
from rq.results import Result
from rq.serializers import JSONSerializer

from shared import keys
from shared.errors import ContextLengthExceeded
from shared.tokenizing import ModelText
from worker.synthesis import MIN_SHARE_TOKENS, TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE, _fit, fill

TEMPLATE = ["Combine:\n{{results}}"]


def overhead(ids: list[str]) -> int:
    return (
        len(b"Combine:\n")
        + TEMPLATE_TOKENS
        + TEMPLATE_TOKENS_PER_MESSAGE
        + sum(len(f"### Result {i}\n\n\n".encode()) for i in ids)
    )


def test_results_that_fit_are_left_whole() -> None:
    texts = [("a", "x" * 100), ("b", "y" * 100)]
    kept, report = _fit(texts, TEMPLATE, ModelText(None, 10_000), max_tokens=100)
    assert kept == texts
    assert report["truncated"] == [] and report["share_tokens"] is None


def test_short_results_keep_everything_and_long_ones_share_the_rest_evenly() -> None:
    texts = [("short", "s" * 50), ("long1", "l" * 2000), ("long2", "m" * 3000)]
    context = overhead(["short", "long1", "long2"]) + 100 + 50 + 2 * 400
    kept, report = _fit(texts, TEMPLATE, ModelText(None, context), max_tokens=100)
    share = report["share_tokens"]
    assert kept[0] == texts[0]
    assert 300 < share <= 400
    assert [t["custom_id"] for t in report["truncated"]] == ["long1", "long2"]
    assert kept[1][1].startswith("l" * share) and kept[1][1].endswith(f"[truncated: first {share} of 2000 tokens]")
    used = overhead(["short", "long1", "long2"]) + sum(len(text.encode()) for _, text in kept)
    assert used + 100 <= context


def test_a_synthesis_that_cannot_fit_a_useful_share_fails_naming_the_sizes() -> None:
    texts = [(f"r{i}", "z" * 500) for i in range(50)]
    context = overhead([t for t, _ in texts]) + 100 + 50 * (MIN_SHARE_TOKENS - 1)
    with pytest.raises(ContextLengthExceeded) as caught:
        _fit(texts, TEMPLATE, ModelText(None, context), max_tokens=100)
    message = caught.value.message
    assert f"context is {context} tokens" in message and "max_tokens is 100" in message and "50 results" in message
    assert caught.value.code == "context_length_exceeded"


def test_a_result_that_contains_a_placeholder_is_not_expanded_again(scratch_redis_url: str) -> None:
    redis = Redis.from_url(scratch_redis_url)
    children = [{"job_id": "ja", "custom_id": "a"}, {"job_id": "jb", "custom_id": "b"}]
    redis.set(keys.batch("b1"), json.dumps({"children": children}))
    queue = Queue("q", connection=redis, serializer=JSONSerializer)
    for job_id, text in (("ja", "see {{result:b}} and {{results}}"), ("jb", "B" * 50)):
        job = queue.enqueue("x.y", job_id=job_id)
        job.set_status("finished")
        Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value={"text": text})
    request = {"messages": [{"role": "user", "content": "{{results}}"}]}
    content = fill(redis, "b1", request, ModelText(None, None), 10).request["messages"][0]["content"]
    assert "### Result a\nsee {{result:b}} and {{results}}" in content
    assert content.count("B" * 50) == 1
