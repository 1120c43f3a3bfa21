"""The configured models, with their size and whether and where workers hold them: what every
protocol's model listing is made from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from redis import Redis

from gateway.operations.workers import live_workers
from shared import pulls, sizing
from shared.models import ModelRegistry, kind_of
from shared.tokenizing import context_length


def listing(models: ModelRegistry, redis: Redis) -> list[dict[str, Any]]:
    """Each configured model in OpenAI's model shape, with mlxq's fields beside."""
    held: dict[str, list[dict[str, Any]]] = {}
    for worker in live_workers(redis):
        for model in worker.get("models", []):
            held.setdefault(model["name"], []).append({**model, "worker": worker["name"]})
    data = []
    pending = {record["name"]: record for record in pulls.every(redis)}
    for spec in models.all():
        copies = [m for m in held.get(spec.name, []) if m.get("state") == "loaded"]
        directory = spec.local_files()
        size = copies[0]["size_bytes"] if copies else (sizing.estimate(directory).weights_bytes if directory else None)
        context = spec.context_tokens or (context_length(directory / "config.json") if directory else None)
        data.append(
            {
                "id": spec.name,
                "object": "model",
                "created": 0,
                "owned_by": "mlxq",
                "source": spec.source,
                "notes": spec.notes,
                "kind": kind_of(spec),
                "size_bytes": size,
                # The context length, by the names vLLM and LM Studio give it.
                "max_model_len": context,
                "max_context_length": context,
                "architecture": architecture(directory) if directory else None,
                "loaded": bool(copies),
                "last_used": max((m["last_used"] for m in copies), default=None),
                "active_requests": sum(m["active_requests"] for m in copies),
                "workers": [m["worker"] for m in copies],
                # Unloaded when idle at this time (epoch seconds); None: serving, pinned or kept for ever.
                "expires_at": _soonest([m.get("expires_at") for m in copies]),
                "problem": spec.problem(),
                "aliases": sorted(alias for alias, name in models.aliases.items() if name == spec.name),
                "pin": spec.pin,
                "warm": spec.warm,
                "defaults": dict(spec.defaults),
                "keep_alive_s": spec.keep_alive_s,
                "downloaded": spec.repo is None or spec.pulled or directory is not None,
                "pull": _pull_view(pending.get(spec.name)),
            }
        )
    return data


def _soonest(times: list[Any]) -> float | None:
    known = [float(t) for t in times if t is not None]
    return min(known) if known else None


def _pull_view(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {k: record.get(k) for k in ("state", "done_bytes", "total_bytes", "percent", "error")}


def entry(models: ModelRegistry, redis: Redis, name: str) -> dict[str, Any]:
    """One model's entry; raises ModelNotFound, naming the models there are, if it is not configured."""
    spec = models.get(name)
    return next(m for m in listing(models, redis) if m["id"] == spec.name)


def architecture(directory: Path) -> str | None:
    """The model's architecture as its config.json names it (`qwen2`, `llama`)."""
    try:
        kind = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return kind if isinstance(kind, str) else None
