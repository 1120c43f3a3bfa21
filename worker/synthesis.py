"""A batch's synthesis prompt: `{{results}}` and `{{result:<custom_id>}}` filled from its children.

A child that failed, was canceled or did not finish is not left out: the
synthesis sees a marker (`[FAILED: ...]`, `[CANCELED]`), so it can say what is
missing. The filled prompt must fit the synthesis model's context with room for
its `max_tokens`: when the results together are too long, each is cut to a fair
share of what is left (results shorter than the share keep all of theirs, the
rest is split evenly among the longer ones), each cut is marked in the text, and
the job's `synthesis_truncation` says what was kept. When even that leaves a
result fewer than `MIN_SHARE_TOKENS`, the synthesis fails with
`context_length_exceeded` naming the sizes instead of running over the limit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job

from shared import keys
from shared.errors import ContextLengthExceeded
from shared.json_bytes import JobSerializer
from shared.tokenizing import ModelText

_ONE = re.compile(r"\{\{result:([^{}]+)\}\}")
_ALL = "{{results}}"
_EITHER = re.compile(r"\{\{results\}\}|\{\{result:([^{}]+)\}\}")

TEMPLATE_TOKENS = 64
"""Room left for the chat template's own tokens (role markers, the generation prompt)."""

TEMPLATE_TOKENS_PER_MESSAGE = 8

MIN_SHARE_TOKENS = 16
"""Below this many tokens per result, a synthesis would see only fragments: it fails instead."""


@dataclass(frozen=True)
class Filled:
    request: dict[str, Any]
    truncation: dict[str, Any] | None
    """None when the context could not be checked (no context length known for the model)."""


def child_texts(redis: Redis, batch_id: str) -> list[tuple[str, str]]:
    """(custom_id, text or failure marker) for each child, in the batch's order."""
    raw = redis.get(keys.batch(batch_id))
    if raw is None:
        raise LookupError(f"batch {batch_id} has expired or never existed")
    record: dict[str, Any] = json.loads(raw)
    texts = []
    for child in record["children"]:
        texts.append((child["custom_id"], _text_of(redis, child["job_id"])))
    return texts


def _text_of(redis: Redis, job_id: str) -> str:
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JobSerializer)
    except NoSuchJobError:
        return "[FAILED: the job's record has expired]"
    status = job.get_status(refresh=False)
    if status == "finished":
        value = job.return_value(refresh=False) or {}
        return str(value.get("text", ""))
    error = job.meta.get("error") or {}
    if status in ("stopped", "canceled") or error.get("code") == "canceled":
        return "[CANCELED]"
    reason = error.get("message") or f"the job ended as {status}"
    return f"[FAILED: {reason}]"


def fill(redis: Redis, batch_id: str, request: dict[str, Any], model: ModelText, max_tokens: int) -> Filled:
    """The synthesis request with every placeholder in its messages replaced, cut to fit `model`."""
    texts = child_texts(redis, batch_id)
    contents = [_content(m) for m in request["messages"]]
    truncation = None
    if model.context is not None:
        texts, truncation = _fit(texts, contents, model, max_tokens)
    by_id = dict(texts)
    everything = "\n\n".join(f"### Result {custom_id}\n{text}" for custom_id, text in texts)

    def one(match: re.Match[str]) -> str:
        if match.group(0) == _ALL:
            return everything
        name = match.group(1).strip()
        return by_id.get(name, f"[no result named {name}]")

    def replace(content: str) -> str:
        # One pass over the template: a result that itself contains a placeholder is left as it is.
        return _EITHER.sub(one, content)

    filled = dict(request)
    filled["messages"] = [{**m, "content": replace(c)} for m, c in zip(request["messages"], contents, strict=True)]
    return Filled(filled, truncation)


def _fit(
    texts: list[tuple[str, str]], contents: list[str], model: ModelText, max_tokens: int
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Each result cut to a fair share of the context left once the template and `max_tokens` are counted."""
    assert model.context is not None
    all_uses = sum(c.count(_ALL) for c in contents)
    one_uses: dict[str, int] = {}
    for content in contents:
        for match in _ONE.finditer(content):
            one_uses[match.group(1).strip()] = one_uses.get(match.group(1).strip(), 0) + 1
    template = "".join(_ONE.sub("", c.replace(_ALL, "")) for c in contents)
    fixed = model.count(template) + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * len(contents)
    fixed += all_uses * sum(model.count(f"### Result {custom_id}\n\n\n") for custom_id, _ in texts)
    budget = model.context - max_tokens - fixed
    weights = [all_uses + one_uses.get(custom_id, 0) for custom_id, _ in texts]
    lengths = [model.count(text) if weight else 0 for (_, text), weight in zip(texts, weights, strict=True)]
    full = fixed + sum(w * n for w, n in zip(weights, lengths, strict=True))
    report: dict[str, Any] = {
        "context_tokens": model.context,
        "max_tokens": max_tokens,
        "prompt_tokens_in_full": full,
        "share_tokens": None,
        "truncated": [],
    }
    if full + max_tokens <= model.context:
        return texts, report
    marker = model.count(_marker(99_999, 99_999))

    def cost(share: int) -> int:
        return sum(w * (min(n, share) + (marker if n > share else 0)) for w, n in zip(weights, lengths, strict=True))

    low, high = 0, max(lengths)
    while low < high:  # the largest share whose cost fits the budget
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    share = low
    if share < MIN_SHARE_TOKENS or cost(share) > budget:
        raise ContextLengthExceeded(
            f"The synthesis prompt needs {full} tokens with every result in full; the model's context is "
            f"{model.context} tokens and max_tokens is {max_tokens}, which leaves under {MIN_SHARE_TOKENS} tokens "
            f"for each of the {sum(1 for w in weights if w)} results: use a model with a longer context, a smaller "
            "max_tokens, or fewer results per synthesis",
            param="synthesis",
        )
    report["share_tokens"] = share
    cut = []
    for (custom_id, text), n in zip(texts, lengths, strict=True):
        if n > share:
            report["truncated"].append({"custom_id": custom_id, "kept_tokens": share, "total_tokens": n})
            text = model.head(text, share) + _marker(share, n)
        cut.append((custom_id, text))
    return cut, report


def _marker(kept: int, total: int) -> str:
    return f"\n[truncated: first {kept} of {total} tokens]"


def _content(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return str(content)
