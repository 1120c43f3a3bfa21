"""Changing the model registry while everything runs: add, change, copy, remove, pull, load.

What the admin routes (gateway/operations/admin_routes.py) and Ollama's model management
(`/api/pull`, `/api/delete`, `/api/copy`) do, in one place. A change is one
stored entry in Redis (shared/live_models.py), seen by every gateway and worker
within a second; a model in use is never taken from under its jobs (a worker
unloads only what is idle). Pulls are checked here, before they are queued, so a
model that cannot fit is refused at once, with the reason, and no byte fetched.
"""

from __future__ import annotations

import json
from typing import Any

import psutil
from redis import Redis

from gateway.operations.workers import live_workers
from shared import hub, keys, pulls
from shared.errors import HubUnavailable, InvalidRequest, ModelConflict, ModelNotFound, ModelTooLarge
from shared.live_models import store, stored_entries
from shared.models import BUILTIN_MODELS, ModelRegistry, ModelSpec, parse_entry, read_models_file
from shared.settings import Settings


def budget_bytes(redis: Redis, settings: Settings) -> int:
    """The model budget a pull must fit: the largest of the live workers', else this machine's."""
    budgets = [int(w["model_budget_bytes"]) for w in live_workers(redis) if w.get("model_budget_bytes")]
    if budgets:
        return max(budgets)
    return settings.model_budget_bytes or int(psutil.virtual_memory().total * settings.model_budget_fraction)


def put(
    redis: Redis, settings: Settings, models: ModelRegistry, name: str, fields: dict[str, Any], merge: bool
) -> dict[str, Any]:
    """Store a model's entry (with `merge`, the fields laid over what it has); returns the entry.
    Checked as a models-file entry is; an error names the field."""
    stored = stored_entries(redis)
    existing = models.find(name)
    if existing is not None and existing.name != name:
        raise ModelConflict(f"'{name}' is an alias of model '{existing.name}'", param="name")
    if name in BUILTIN_MODELS:
        raise ModelConflict(f"'{name}' is built in and cannot be changed", param="name")
    if merge and existing is None:
        raise ModelNotFound(f"The model '{name}' does not exist or is not configured here", param="model")
    entry = {**stored.get(name, {}), **fields} if merge else dict(fields)
    _check(settings, models, name, entry)
    store(redis, name, entry)
    models.catch_up()
    return entry


def remove(redis: Redis, settings: Settings, models: ModelRegistry, name: str) -> dict[str, Any]:
    """Remove a model the API added (with its pulled files, unless the models file names it too).
    A model the models file defines is only edited there."""
    spec = models.get(name)
    stored = stored_entries(redis)
    if spec.name not in stored:
        where = "is built in" if spec.builtin else "is defined in the models file; remove it there"
        raise ModelConflict(f"Model '{spec.name}' {where}", param="model")
    pending = pulls.read(redis, spec.name)
    store(redis, spec.name, None)
    pulls.forget(redis, spec.name)  # a download running for it stops at its next beat
    models.catch_up()
    from_file = _file_entry(settings, spec.name) is not None
    freed = 0
    others = [s for s in models.all() if s.name != spec.name and s.repo == spec.repo]
    fetched = spec.pulled or (pending is not None and pending["state"] in pulls.PENDING)
    if spec.repo and fetched and not from_file and not others:
        freed = hub.remove(spec.repo)
    _unload(redis, spec.name)
    return {"model": spec.name, "removed": True, "freed_bytes": freed, "still_in_models_file": from_file}


def copy(redis: Redis, settings: Settings, models: ModelRegistry, source: str, destination: str) -> dict[str, Any]:
    """A new model `destination` with the entry of `source` (Ollama's copy): same files, its own settings."""
    spec = models.get(source)
    if models.find(destination) is not None:
        raise ModelConflict(f"A model or alias named '{destination}' exists already", param="destination")
    if spec.builtin:
        raise ModelConflict(f"'{spec.name}' is built in and cannot be copied", param="source")
    entry = spec_entry(spec)
    _check(settings, models, destination, entry, param="destination")
    store(redis, destination, entry)
    models.catch_up()
    return {"model": destination, "source": spec.name}


def pull(
    redis: Redis, settings: Settings, models: ModelRegistry, repo: str, name: str | None, fields: dict[str, Any]
) -> dict[str, Any]:
    """Queue the download of hub `repo` as model `name` (the repo's id by default), after checking
    that it exists and would fit; its files already here register it at once."""
    name = name or repo
    existing = models.find(name)
    if existing is not None and existing.name != name:
        raise ModelConflict(f"'{name}' is an alias of model '{existing.name}'", param="name")
    if existing is not None and existing.repo != repo:
        raise ModelConflict(f"Model '{name}' exists already, from {existing.source}", param="name")
    stored = stored_entries(redis)
    # A models file's model gets only what was asked laid over it; a new one is all in its entry.
    in_file = _file_entry(settings, name) is not None
    entry = {**stored.get(name, {}), **fields, "pulled": True} | ({} if in_file else {"repo": repo})
    _check(settings, models, name, entry)
    record = pulls.read(redis, name)
    if record is not None and record["state"] in pulls.PENDING:
        return record
    try:
        plan = hub.plan(repo)
    except hub.HubError as exc:
        if exc.kind == "missing":
            raise ModelNotFound(str(exc), param="model") from exc
        if exc.kind in ("refused", "unusable"):
            raise InvalidRequest(str(exc), param="model") from exc
        raise HubUnavailable(str(exc)) from exc
    problem = hub.fit_problem(plan, budget_bytes(redis, settings))
    if problem is not None:
        raise ModelTooLarge(problem, param="model")
    if plan.missing_bytes == 0:
        pulls.forget(redis, name)  # an earlier failure's record would tell the wrong story
        store(redis, name, entry)
        models.catch_up()
        done = {"state": "done", "total_bytes": plan.total_bytes, "done_bytes": plan.total_bytes, "percent": 100.0}
        return {"name": name, "repo": repo, **done, "error": ""}
    pulls.start(redis, name, repo, None, plan.total_bytes, entry)
    found = pulls.read(redis, name)
    assert found is not None
    return found


def ensure_pulled(redis: Redis, models: ModelRegistry, name: str) -> None:
    """A hub model not yet on this machine starts its pull on its first request (as Ollama's run
    does); the request's job waits in its queue until the files are here."""
    spec = models.find(name)
    # `pulled` is the worker's word (its files may be on another machine than this gateway's)
    if spec is None or spec.repo is None or spec.pulled or spec.local_files() is not None:
        return
    record = pulls.read(redis, spec.name)
    if record is not None and record["state"] in pulls.PENDING:
        return
    pulls.start(redis, spec.name, spec.repo, None, 0, {"pulled": True})


def load(redis: Redis, models: ModelRegistry, name: str) -> dict[str, Any]:
    """Ask the workers to load the model now (once no batch runs), before any request needs it."""
    spec = models.get(name)
    asked = _ask_workers(redis, {"command": "load", "model": spec.name})
    return {"model": spec.name, "workers": asked}


def unload(redis: Redis, models: ModelRegistry, name: str) -> dict[str, Any]:
    """Ask every worker holding the model to unload it as soon as it is idle (pinned or not)."""
    spec = models.get(name)
    return {"model": spec.name, "workers": _unload(redis, spec.name)}


def _unload(redis: Redis, name: str) -> list[str]:
    holding = [w["name"] for w in live_workers(redis) if any(m["name"] == name for m in w.get("models", []))]
    return _ask_workers(redis, {"command": "unload", "model": name}, holding)


def spec_entry(spec: ModelSpec) -> dict[str, Any]:
    """A spec as a stored entry (what `copy` stores for its new name)."""
    entry: dict[str, Any] = {"repo": spec.repo} if spec.repo else {"path": str(spec.path)}
    optional = {
        "notes": spec.notes,
        "context_tokens": spec.context_tokens,
        "max_prompt_chars": spec.max_prompt_chars,
        "keep_alive_s": spec.keep_alive_s,
        "reasoning": list(spec.reasoning) if isinstance(spec.reasoning, tuple) else spec.reasoning,
        "chat_template_kwargs": dict(spec.chat_template_kwargs) or None,
        "defaults": dict(spec.defaults) or None,
        "pin": spec.pin or None,
        "warm": spec.warm or None,
    }
    return entry | {k: v for k, v in optional.items() if v not in (None, "")}


def _check(settings: Settings, models: ModelRegistry, name: str, entry: dict[str, Any], param: str = "name") -> None:
    """The entry as the registry will read it (laid over the models file's entry of that name),
    checked as a models file's would be; a field's error names the field."""
    for alias in entry.get("aliases") or []:
        other = models.find(alias)
        if isinstance(alias, str) and other is not None and other.name != name:
            raise ModelConflict(f"'{alias}' already names model '{other.name}'", param="aliases")
    fields = {**(_file_entry(settings, name) or {}), **entry}
    base = settings.models_file.expanduser().parent if settings.models_file is not None else None
    try:
        parse_entry(name, fields, f"model '{name}'", base)
    except ValueError as exc:
        message = str(exc)
        field = next((k for k in sorted(fields, key=len, reverse=True) if f"`{k}" in message), param)
        raise InvalidRequest(message, param=field) from exc


def _file_entry(settings: Settings, name: str) -> dict[str, Any] | None:
    """The models file's own entry for `name`, as written."""
    if settings.models_file is None:
        return None
    try:
        return read_models_file(settings.models_file.expanduser())[0].get(name)
    except (OSError, ValueError):
        return None


def _ask_workers(redis: Redis, command: dict[str, Any], workers: list[str] | None = None) -> list[str]:
    """Send `command` to `workers` (every live one by default); the names asked."""
    asked = [w["name"] for w in live_workers(redis)] if workers is None else workers
    with redis.pipeline(transaction=False) as pipe:
        for worker in asked:
            pipe.rpush(keys.worker_commands(worker), json.dumps(command))
            pipe.expire(keys.worker_commands(worker), keys.WORKER_COMMANDS_TTL_S)
        pipe.execute()
    return asked
