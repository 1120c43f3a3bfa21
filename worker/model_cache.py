"""Models loaded in this worker, kept between jobs.

Only the engine thread touches it: MLX arrays belong to the thread that runs them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from mlx_lm import load

from shared.errors import ModelUnavailable
from shared.models import ModelSpec
from worker.demo_model import build_demo_model

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    load_s: float
    last_used: float


class ModelCache:
    """Loads a model on first use and keeps it for the next job."""

    def __init__(self) -> None:
        self._loaded: dict[str, LoadedModel] = {}

    def get(self, spec: ModelSpec) -> tuple[LoadedModel, float]:
        """The loaded model and the seconds this call spent loading it (0 when already loaded)."""
        entry = self._loaded.get(spec.name)
        if entry is None:
            entry = self._load(spec)
            self._loaded[spec.name] = entry
            spent = entry.load_s
        else:
            spent = 0.0
        entry.last_used = time.time()
        return entry, spent

    def loaded_names(self) -> list[str]:
        return sorted(self._loaded)

    def _load(self, spec: ModelSpec) -> LoadedModel:
        problem = spec.problem()
        if problem is not None:
            raise ModelUnavailable(problem, param="model")
        started = time.perf_counter()
        if spec.builtin:
            assert spec.path is not None
            build_demo_model(spec.path)
        try:
            model, tokenizer = load(spec.source)[:2]
        except Exception as exc:  # mlx-lm raises bare ValueError/OSError/hub errors: translate here
            raise ModelUnavailable(
                f"Model '{spec.name}' could not be loaded from {spec.source}: {type(exc).__name__}: {exc}",
                param="model",
            ) from exc
        load_s = time.perf_counter() - started
        logger.info("loaded model %s from %s in %.2f s", spec.name, spec.source, load_s)
        return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, load_s=load_s, last_used=time.time())
