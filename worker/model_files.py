"""A model's files on this machine, and reading them with mlx-lm, its errors in our words.

The builtin models are built here on first use; a hub model is never downloaded
here, inside a job: a pull does that (worker/downloads.py), and the job waits for
it in its queue. What is read, and what holds it, is the model cache's
(worker/model_cache.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mlx_lm import load

from shared.errors import ModelUnavailable
from shared.models import ModelSpec, kind_of
from worker import embedding
from worker.demo_model import build_builtin


def files(spec: ModelSpec) -> Path:
    """The local directory of the model's files (a builtin's built if need be)."""
    problem = spec.problem()
    if problem is not None:
        raise ModelUnavailable(problem, param="model")
    if spec.path is not None:
        if spec.builtin:
            build_builtin(spec.name, spec.path)
        return spec.path
    directory = spec.local_files()
    if directory is None:
        raise ModelUnavailable(
            f"Model '{spec.name}' ({spec.repo}) is not on this machine: pull it first"
            f" (`mlxq pull {spec.repo} --name {spec.name}`, or POST /v1/admin/models/pull)",
            param="model",
        )
    return directory


def read(spec: ModelSpec, directory: Path) -> tuple[Any, Any]:
    """The model and its tokenizer from `directory`. An allocation failure is raised as it is (the caller
    frees memory and says so); anything else mlx-lm raises (bare ValueError, OSError, hub errors) is
    ModelUnavailable."""
    try:
        if kind_of(spec) == "embed":
            return embedding.read(directory)
        model, tokenizer = load(str(directory))[:2]
        return model, tokenizer
    except Exception as exc:
        if is_allocation_failure(exc):
            raise
        raise ModelUnavailable(
            f"Model '{spec.name}' could not be loaded from {spec.source}: {type(exc).__name__}: {exc}", param="model"
        ) from exc


IDENTITY_SAMPLE_BYTES = 1 << 20
"""Bytes read from each end of each weights file for its identity: weights retrained to the same shapes
differ there, and reading 70 GB to name a model would take minutes."""


def identity(directory: Path) -> str:
    """A name for the model in `directory` that changes when its files do (its config, its weights'
    names, sizes and first and last bytes), the same wherever the files are copied: states computed
    by one model are never read by another (worker/prefix_disk.py)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or (path.suffix == ".json" and "index" in path.name):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix == ".safetensors":
            size = path.stat().st_size
            digest.update(f"{path.name}\0{size}\0".encode())
            with path.open("rb") as f:
                digest.update(f.read(IDENTITY_SAMPLE_BYTES))
                f.seek(max(0, size - IDENTITY_SAMPLE_BYTES))
                digest.update(f.read(IDENTITY_SAMPLE_BYTES))
    return digest.hexdigest()


def is_allocation_failure(exc: BaseException) -> bool:
    """MemoryError, or one of MLX's allocator errors (Metal, CUDA, CPU word them differently)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("malloc", "allocat", "out of memory", "outofmemory")
    )
