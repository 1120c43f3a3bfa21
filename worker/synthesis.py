"""A batch's synthesis prompt: `{{results}}` and `{{result:<custom_id>}}` filled from its children.

A child that failed (or did not finish) is not left out: the synthesis sees a
marker with its error, so it can say what is missing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from shared import keys

_ONE = re.compile(r"\{\{result:([^{}]+)\}\}")


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
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except NoSuchJobError:
        return "[FAILED: the job's record has expired]"
    status = job.get_status(refresh=False)
    if status == "finished":
        value = job.return_value(refresh=False) or {}
        return str(value.get("text", ""))
    error = job.meta.get("error") or {}
    reason = error.get("message") or f"the job ended as {status}"
    return f"[FAILED: {reason}]"


def fill(redis: Redis, batch_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """The synthesis request with every placeholder in its messages replaced."""
    texts = child_texts(redis, batch_id)
    by_id = dict(texts)
    everything = "\n\n".join(f"### Result {custom_id}\n{text}" for custom_id, text in texts)

    def replace(content: str) -> str:
        content = content.replace("{{results}}", everything)
        return _ONE.sub(lambda m: by_id.get(m.group(1).strip(), f"[no result named {m.group(1).strip()}]"), content)

    filled = dict(request)
    filled["messages"] = [{**m, "content": replace(_content(m))} for m in request["messages"]]
    return filled


def _content(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return str(content)
