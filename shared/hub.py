"""Models from the Hugging Face Hub: what a download would fetch, whether it fits, the download itself.

What the files are and how big comes from `huggingface_hub` (its dry run reads
the hub's file metadata, no body fetched), and so do each file's URL and the
auth headers. The download itself is ours: huggingface_hub 2.4 starts every
file again from byte 0 in a new process (each attempt writes a fresh randomly
named `.incomplete`, left behind on a kill), and a 40 GB pull must survive a
restart of the worker doing it. So each file is fetched into `NAME.part` with an
HTTP Range from what is there, and renamed when complete; the directory is
marked complete last. `HF_ENDPOINT` says which hub, `HF_TOKEN` as whom;
files go under `HF_HUB_CACHE`/mlxq-pulls.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""The files mlx-lm loads a model from (weights, config, tokenizer, chat template)."""


class HubError(Exception):
    """The hub could not be asked, or said no; the message says which, for the person pulling."""

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind
        """`missing` (no such repo or revision), `refused` (gated, private, offline), `unusable` (not
        an MLX model) or `unreachable`."""


@dataclass(frozen=True)
class Plan:
    """What pulling a repo would fetch, from the hub's file metadata (no file body read)."""

    repo: str
    revision: str | None
    commit: str
    files: tuple[tuple[str, int], ...]
    """(path in the repo, bytes) of each file."""
    total_bytes: int
    weights_bytes: int
    missing_bytes: int
    """Bytes not yet on this machine: what the download still has to fetch."""


def plan(repo: str, revision: str | None = None) -> Plan:
    """The files of `repo` that a pull fetches and their sizes; raises HubError."""
    from huggingface_hub import snapshot_download

    try:
        infos = snapshot_download(repo, revision=revision, allow_patterns=PATTERNS, dry_run=True)
    except Exception as exc:
        raise _error(repo, exc) from exc
    assert isinstance(infos, list)
    weights = sum((i.file_size or 0) for i in infos if i.filename.endswith(".safetensors"))
    if not any(i.filename == "config.json" for i in infos) or weights == 0:
        missing = "no config.json or no .safetensors weights: not an MLX model"
        raise HubError(f"'{repo}' on the hub has {missing}", "unusable")
    here = pulled_dir(repo)
    files = tuple((i.filename, i.file_size or 0) for i in infos)
    return Plan(
        repo,
        revision,
        commit=infos[0].commit_hash,
        files=files,
        total_bytes=sum(size for _, size in files),
        weights_bytes=weights,
        missing_bytes=0 if complete(repo) else sum(size - _size(here / name) for name, size in files),
    )


def fit_problem(plan: Plan, budget_bytes: int) -> str | None:
    """Why the model cannot be pulled for this machine, or None: its weights must fit the model
    budget (MLX holds them all in memory) and what is missing must fit the disk."""
    if plan.weights_bytes > budget_bytes:
        return (
            f"'{plan.repo}' needs {_gb(plan.weights_bytes)} for its weights; this machine's model budget is"
            f" {_gb(budget_bytes)} (MLXQ_MODEL_BUDGET_BYTES / MLXQ_MODEL_BUDGET_FRACTION)"
        )
    free = shutil.disk_usage(_existing(cache_dir())).free
    if plan.missing_bytes > free:
        return f"'{plan.repo}' needs {_gb(plan.missing_bytes)} more on disk; {cache_dir()} has {_gb(free)} free"
    return None


def download(plan: Plan, stop: Callable[[], bool] = lambda: False) -> Path:
    """Fetch the plan's files into the repo's directory, each resumed from what an earlier attempt
    left (an HTTP Range), and mark the directory complete; raises HubError (also once `stop()`)."""
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils._headers import build_hf_headers

    folder = pulled_dir(plan.repo)
    folder.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    try:
        with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0), headers=headers) as client:
            for name, size in plan.files:
                target = folder / name
                if not target.resolve().is_relative_to(folder.resolve()):
                    raise HubError(f"the hub listed a file outside the repo ({name!r}); nothing more is fetched")
                if _size(target) == size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _fetch(client, hf_hub_url(plan.repo, name, revision=plan.commit), target, size, stop)
    except httpx.HTTPError as exc:
        said = f"the download of '{plan.repo}' broke off ({type(exc).__name__}: {exc}); pull again to resume"
        raise HubError(said) from exc
    (folder / COMPLETE).write_text(plan.commit)
    return folder


def _fetch(client: Any, url: str, target: Path, size: int, stop: Callable[[], bool]) -> None:
    part = target.with_name(target.name + ".part")
    have = _size(part)
    if have > size:  # not this file's beginning (another writer, or the file changed): start again
        part.unlink()
        have = 0
    ranged = {"Range": f"bytes={have}-"} if 0 < have < size else {}
    with client.stream("GET", url, headers=ranged) as response:
        if response.status_code == 416:  # what is here is all there is
            have, ranged = size, {}
        elif response.status_code >= 400:
            raise HubError(f"the hub answered {response.status_code} for {target.name}")
        elif ranged and response.status_code != 206:
            have = 0  # the server sent the whole file: start the part again
        if have < size:
            with part.open("ab" if have else "wb") as out:
                for piece in response.iter_bytes():  # as it arrives: a kill loses only the last piece
                    out.write(piece)
                    if stop():
                        raise HubError(f"the pull of {target.name} was stopped", "stopped")
    if _size(part) != size:
        raise HubError(f"{target.name} came to {_size(part)} bytes, not {size}; pull again to resume")
    part.replace(target)


def complete(repo: str) -> bool:
    return (pulled_dir(repo) / COMPLETE).is_file()


def pulled_dir(repo: str) -> Path:
    """Where a pull puts the repo's files (a directory mlx-lm loads from)."""
    return cache_dir() / "mlxq-pulls" / repo.replace("/", "--")


COMPLETE = ".mlxq-complete"
"""Written last, holding the commit: the directory has every file of the pull."""


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def bytes_here(repo: str) -> int:
    """Bytes of the repo's files here so far, partial ones included: a download's progress."""
    total = 0
    for root, _, names in os.walk(pulled_dir(repo)):
        total += sum(_size(Path(root) / name) for name in names if name != COMPLETE)
    return total


def remove(repo: str) -> int:
    """Delete the pulled files of the repo; the bytes freed."""
    freed = bytes_here(repo)
    shutil.rmtree(pulled_dir(repo), ignore_errors=True)
    return freed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _error(repo: str, exc: Exception) -> HubError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    exc = exc.__cause__ if isinstance(exc.__cause__, Exception) and type(exc).__name__ == "DryRunError" else exc
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError("downloads are off here (HF_HUB_OFFLINE=1)", "refused")
    if isinstance(exc, GatedRepoError):
        return HubError(f"'{repo}' is gated on the hub: accept its terms there and give a token (HF_TOKEN)", "refused")
    if isinstance(exc, RepositoryNotFoundError):
        where = constants.ENDPOINT
        return HubError(f"'{repo}' is not on the hub at {where} (or it is private: give a token, HF_TOKEN)", "missing")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"'{repo}' has no such revision on the hub", "missing")
    return HubError(f"the hub at {constants.ENDPOINT} could not give '{repo}': {type(exc).__name__}: {exc}")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
