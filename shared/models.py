"""The models file: which models may be requested, and where each one lives.

```toml
[models.coder]
repo = "mlx-community/Qwen2.5-Coder-32B-Instruct-4bit"   # Hugging Face repo id
notes = "coding"

[models.local-llama]
path = "~/models/llama-3.1-8b-4bit"                       # a local directory
```

Exactly one of `path` (local directory, never looked up on a hub) or `repo`
(hub id) per model, and optionally `context_tokens`, `max_prompt_chars` and
`keep_alive_s` to override the model's context length, the service's prompt
limit and how long the model may sit idle before it is unloaded. `demo` is
built in: a tiny random-weight model built offline.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ModelNotFound
from shared.settings import Settings

DEMO_MODEL = "demo"
_ALLOWED_KEYS = {
    "path",
    "repo",
    "notes",
    "context_tokens",
    "max_prompt_chars",
    "keep_alive_s",
    "reasoning",
    "chat_template_kwargs",
}


@dataclass(frozen=True)
class ModelSpec:
    """One requestable model."""

    name: str
    path: Path | None = None
    repo: str | None = None
    notes: str = ""
    builtin: bool = False
    context_tokens: int | None = None
    """Overrides the context length read from the model's config.json."""
    max_prompt_chars: int | None = None
    """Overrides the service-wide prompt length limit for this model."""
    keep_alive_s: int | None = None
    """Overrides how long this model may sit idle before it is unloaded."""
    reasoning: tuple[str, str] | bool | None = None
    """Its reasoning markers (start, end), or False: no reasoning split; None: as its tokenizer says."""
    chat_template_kwargs: tuple[tuple[str, bool | int | str], ...] = ()
    """Passed to its chat template unless a request says otherwise (e.g. enable_thinking = false)."""

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else str(self.repo)

    def local_files(self) -> Path | None:
        """The directory holding this model's files on this machine, if they are here (never downloads)."""
        if self.path is not None:
            return self.path if self.path.is_dir() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(self.repo), "config.json")
        except Exception:
            return None
        return Path(found).parent if isinstance(found, str) else None

    def problem(self) -> str | None:
        """Why this model cannot be loaded from here, or None when nothing is known to be wrong.

        mlx-lm would take a missing local path for a hub id and fail with a
        confusing download error, so a missing path is caught by name here.
        """
        if self.builtin or self.path is None:
            return None
        if not self.path.is_dir():
            return f"local path {self.path} for model '{self.name}' does not exist or is not a directory"
        if not (self.path / "config.json").is_file():
            return f"local path {self.path} for model '{self.name}' has no config.json"
        return None


class ModelRegistry:
    """The models named in the models file, plus `demo`."""

    def __init__(self, specs: dict[str, ModelSpec], aliases: dict[str, str] | None = None) -> None:
        self._specs = specs
        self.aliases = aliases or {}
        """Other names a model answers to (clients with a fixed default model name)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        specs = {
            DEMO_MODEL: ModelSpec(
                DEMO_MODEL,
                path=settings.demo_model_dir,
                notes="tiny random-weight model, built offline",
                builtin=True,
            )
        }
        aliases: dict[str, str] = {}
        if settings.models_file is not None:
            path = settings.models_file.expanduser()
            specs.update(load_models_file(path))
            aliases = load_aliases(path, specs)
        return cls(specs, aliases)

    def get(self, name: str) -> ModelSpec:
        """The model by its name, or by an alias of it."""
        try:
            return self._specs[self.aliases.get(name, name)]
        except KeyError:
            known = ", ".join(sorted(self._specs))
            raise ModelNotFound(
                f"The model '{name}' does not exist or is not configured here (known: {known})", param="model"
            ) from None

    def all(self) -> list[ModelSpec]:
        return [self._specs[name] for name in sorted(self._specs)]


def load_aliases(path: Path, specs: dict[str, ModelSpec]) -> dict[str, str]:
    """The models file's `[aliases]` table: another name -> a model's name (`"gpt-4.1" = "coder"`)."""
    with path.open("rb") as handle:
        table = tomllib.load(handle).get("aliases", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [aliases] must be a table of names")
    for alias, target in table.items():
        if not isinstance(target, str) or target not in specs:
            raise ValueError(f"{path}: [aliases] {alias!r} names {target!r}, which is not a model here")
        if alias in specs:
            raise ValueError(f"{path}: [aliases] {alias!r} is already a model's name")
    return dict(table)


def load_models_file(path: Path) -> dict[str, ModelSpec]:
    """Parse a models file; a malformed one stops start-up with the file and entry named."""
    with path.open("rb") as handle:
        document = tomllib.load(handle)
    table = document.get("models", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [models] must be a table")
    specs: dict[str, ModelSpec] = {}
    for name, entry in table.items():
        where = f"{path}: [models.{name}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a table")
        unknown = set(entry) - _ALLOWED_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}")
        if ("path" in entry) == ("repo" in entry):
            raise ValueError(f"{where}: give exactly one of `path` (local directory) or `repo` (hub id)")
        if name == DEMO_MODEL:
            raise ValueError(f"{where}: '{DEMO_MODEL}' is built in and cannot be redefined")
        local = None
        if "path" in entry:
            local = Path(str(entry["path"])).expanduser()
            if not local.is_absolute():
                local = (path.parent / local).resolve()
        for limit in ("context_tokens", "max_prompt_chars", "keep_alive_s"):
            if limit in entry and (not isinstance(entry[limit], int) or entry[limit] < 1):
                raise ValueError(f"{where}: `{limit}` must be a positive integer")
        reasoning = entry.get("reasoning")
        if not (reasoning is None or reasoning is False or _two_strings(reasoning)):
            raise ValueError(f'{where}: `reasoning` must be false or ["<start marker>", "<end marker>"]')
        kwargs = entry.get("chat_template_kwargs", {})
        if not isinstance(kwargs, dict) or not all(isinstance(v, bool | int | str) for v in kwargs.values()):
            raise ValueError(f"{where}: `chat_template_kwargs` must be a table of strings, numbers and booleans")
        specs[name] = ModelSpec(
            name,
            path=local,
            reasoning=tuple(reasoning) if isinstance(reasoning, list) else reasoning,
            chat_template_kwargs=tuple(sorted(kwargs.items())),
            repo=entry.get("repo"),
            notes=str(entry.get("notes", "")),
            context_tokens=entry.get("context_tokens"),
            max_prompt_chars=entry.get("max_prompt_chars"),
            keep_alive_s=entry.get("keep_alive_s"),
        )
    return specs


def _two_strings(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value)
