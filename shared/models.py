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
limit and how long the model may sit idle before it is unloaded; `aliases`,
sampling `defaults`, `pin`, `warm`, `reasoning` and `chat_template_kwargs`.
The admin API's entries (kept in Redis, shared/live_models.py) are checked by
the same `parse_entry` and laid over the file's. `demo` is built in: a tiny
random-weight model built offline.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import hub
from shared.errors import ModelNotFound
from shared.settings import Settings

logger = logging.getLogger(__name__)

DEMO_MODEL = "demo"
TINY_MODEL = "tiny"
EMBED_MODEL = "embed"
BUILTIN_MODELS = {
    DEMO_MODEL: "random weights, built offline: counts tokens like a real model (32k vocabulary), 128k context",
    TINY_MODEL: "tiny random-weight model, built offline: fast, for tests (512-token vocabulary, 32k context)",
    EMBED_MODEL: "random-weight BERT embedding model, built offline: 128-dimensional vectors, 512 tokens an input",
}
"""The models every mlxq serves (worker/demo_model.py builds them), with their notes."""
ALLOWED_KEYS = {
    "path",
    "repo",
    "notes",
    "context_tokens",
    "max_prompt_chars",
    "keep_alive_s",
    "reasoning",
    "chat_template_kwargs",
    "aliases",
    "defaults",
    "pin",
    "warm",
    "pulled",
    "kind",
}
KINDS = ("generate", "embed", "rerank")
"""What a model does: generate text (mlx-lm), embed texts as vectors (mlx-embeddings), or judge documents
against a query (an LLM reranker such as Qwen3-Reranker, read by mlx-lm: worker/reranking.py)."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_FIELDS: dict[str, tuple[float, float, bool]] = {
    # field: (lowest, highest, whole numbers only), the ranges a request's own value must be in
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1_000_000, True),
    "min_p": (0.0, 1.0, False),
    "max_tokens": (1, 10_000_000, True),
    "repetition_penalty": (0.1, 10.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
}
"""The sampling fields a model may set defaults for (a request's own value wins)."""


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
    aliases: tuple[str, ...] = ()
    """Other names it answers to."""
    defaults: tuple[tuple[str, float | int], ...] = ()
    """Sampling fields (temperature, top_p, max_tokens...) a request that leaves them out gets."""
    pin: bool = False
    """Never unloaded to make room or for idleness (only by an explicit unload)."""
    warm: bool = False
    """Loaded by a worker as soon as it starts (and when the entry appears), before any request."""
    pulled: bool = False
    """Its files came from a pull (removing the model deletes them)."""
    kind: str | None = None
    """"generate", "embed" or "rerank" as the models file says; None: as its files say (`kind_of`)."""

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else str(self.repo)

    def local_files(self) -> Path | None:
        """The directory holding this model's files on this machine, if they are here (never downloads):
        a hub model's pull (shared/hub.py), else huggingface_hub's cache (another tool's download)."""
        if self.path is not None:
            return self.path if self.path.is_dir() else None
        if hub.complete(str(self.repo)):
            return hub.pulled_dir(str(self.repo))
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
    """The models named in the models file and those added through the admin API, plus `demo`."""

    def __init__(self, specs: dict[str, ModelSpec], aliases: dict[str, str] | None = None) -> None:
        names = dict(aliases or {})
        for spec in specs.values():
            names.update({alias: spec.name for alias in spec.aliases if alias not in specs})
        self._state = (specs, names)
        """One value, swapped whole by `replace`: a reader never sees one registry's models with
        another's aliases."""
        self.on_miss: Callable[[], bool] | None = None
        """Asked, when a name is not found, to bring the registry up to date (True if it changed):
        a model added a moment ago through another process answers at once, not a second later."""

    @property
    def aliases(self) -> dict[str, str]:
        """Other names a model answers to (clients with a fixed default model name)."""
        return self._state[1]

    def replace(self, other: ModelRegistry) -> None:
        """Take `other`'s models: the live registry (shared/live_models.py) updates this one in place,
        so that everything holding it sees the change."""
        self._state = other._state

    @classmethod
    def from_settings(cls, settings: Settings, stored: dict[str, dict[str, Any]] | None = None) -> ModelRegistry:
        """The models file's models (a malformed file raises, naming it), with `stored` entries (the
        admin API's, by name) laid over them: a stored entry for a file's model changes only the
        fields it names."""
        specs = {
            name: ModelSpec(
                name,
                path=settings.builtin_model_dir(name),
                notes=notes,
                builtin=True,
                kind="embed" if name == EMBED_MODEL else "generate",
            )
            for name, notes in BUILTIN_MODELS.items()
        }
        entries: dict[str, dict[str, Any]] = {}
        table: dict[str, Any] = {}
        base: Path | None = None
        if settings.models_file is not None:
            path = settings.models_file.expanduser()
            entries, table = read_models_file(path)
            base = path.parent
            for name, entry in entries.items():
                specs[name] = parse_entry(name, entry, f"{path}: [models.{name}]", base)
        for name, override in (stored or {}).items():
            try:
                specs[name] = parse_entry(name, {**entries.get(name, {}), **override}, f"model '{name}'", base)
            except ValueError as exc:  # written by an older or newer version: the rest still serve
                logger.warning("ignoring the stored entry of a model: %s", exc)
        aliases = check_aliases(table, specs, settings.models_file)
        return cls(specs, aliases)

    def catch_up(self) -> None:
        """Bring the registry up to date now (after this process changed it)."""
        if self.on_miss is not None:
            self.on_miss()

    def get(self, name: str) -> ModelSpec:
        """The model by its name, or by an alias of it."""
        if self.find(name) is None:
            self.catch_up()
        specs, aliases = self._state
        try:
            return specs[aliases.get(name, name)]
        except KeyError:
            known = ", ".join(sorted(specs))
            raise ModelNotFound(
                f"The model '{name}' does not exist or is not configured here (known: {known})", param="model"
            ) from None

    def find(self, name: str) -> ModelSpec | None:
        specs, aliases = self._state
        return specs.get(aliases.get(name, name))

    def all(self) -> list[ModelSpec]:
        specs = self._state[0]
        return [specs[name] for name in sorted(specs)]


def read_models_file(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The models file's `[models]` entries (each a table) and its `[aliases]` table, unchecked."""
    with path.open("rb") as handle:
        document = tomllib.load(handle)
    table = document.get("models", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [models] must be a table")
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: [models.{name}] must be a table")
    aliases = document.get("aliases", {})
    if not isinstance(aliases, dict):
        raise ValueError(f"{path}: [aliases] must be a table of names")
    return table, aliases


def check_aliases(table: dict[str, Any], specs: dict[str, ModelSpec], path: Path | None) -> dict[str, str]:
    """The models file's `[aliases]` table: another name -> a model's name (`"gpt-4.1" = "coder"`)."""
    for alias, target in table.items():
        if not isinstance(target, str) or target not in specs:
            raise ValueError(f"{path}: [aliases] {alias!r} names {target!r}, which is not a model here")
        if alias in specs:
            raise ValueError(f"{path}: [aliases] {alias!r} is already a model's name")
    return dict(table)


def load_models_file(path: Path) -> dict[str, ModelSpec]:
    """Parse a models file; a malformed one stops start-up with the file and entry named."""
    entries, _ = read_models_file(path)
    return {name: parse_entry(name, entry, f"{path}: [models.{name}]", path.parent) for name, entry in entries.items()}


def parse_entry(name: str, entry: dict[str, Any], where: str, base: Path | None = None) -> ModelSpec:
    """One model's entry (a models-file table or the admin API's body), checked; a ValueError names
    `where` and the field. A relative `path` is taken from `base` (the models file's directory)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{where}: a model's name is 1-128 letters, digits and . _ - : / (got {name!r})")
    unknown = set(entry) - ALLOWED_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(ALLOWED_KEYS)}")
    if ("path" in entry) == ("repo" in entry):
        raise ValueError(f"{where}: give exactly one of `path` (local directory) or `repo` (hub id)")
    if name in BUILTIN_MODELS:
        raise ValueError(f"{where}: '{name}' is built in and cannot be redefined")
    for text in ("path", "repo", "notes"):
        if text in entry and not isinstance(entry[text], str):
            raise ValueError(f"{where}: `{text}` must be a string")
    if "repo" in entry and not REPO.fullmatch(entry["repo"]):
        raise ValueError(f"{where}: `repo` must be a hub id, owner/name (got {entry['repo']!r})")
    local = None
    if "path" in entry:
        local = Path(entry["path"]).expanduser()
        if not local.is_absolute():
            if base is None:
                raise ValueError(f"{where}: `path` must be absolute")
            local = (base / local).resolve()
    for limit in ("context_tokens", "max_prompt_chars", "keep_alive_s"):
        value = entry.get(limit)
        if limit in entry and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}: `{limit}` must be a positive integer")
    reasoning = entry.get("reasoning")
    if not (reasoning is None or reasoning is False or _two_strings(reasoning)):
        raise ValueError(f'{where}: `reasoning` must be false or ["<start marker>", "<end marker>"]')
    kwargs = entry.get("chat_template_kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(v, bool | int | str) for v in kwargs.values()):
        raise ValueError(f"{where}: `chat_template_kwargs` must be a table of strings, numbers and booleans")
    for flag in ("pin", "warm", "pulled"):
        if not isinstance(entry.get(flag, False), bool):
            raise ValueError(f"{where}: `{flag}` must be true or false")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and NAME.fullmatch(a) for a in aliases):
        raise ValueError(f"{where}: `aliases` must be a list of names")
    if "kind" in entry and entry["kind"] not in KINDS:
        raise ValueError(f"{where}: `kind` must be one of {', '.join(KINDS)}")
    return ModelSpec(
        name,
        kind=entry.get("kind"),
        path=local,
        reasoning=tuple(reasoning) if isinstance(reasoning, list) else reasoning,
        chat_template_kwargs=tuple(sorted(kwargs.items())),
        repo=entry.get("repo"),
        notes=str(entry.get("notes", "")),
        context_tokens=entry.get("context_tokens"),
        max_prompt_chars=entry.get("max_prompt_chars"),
        keep_alive_s=entry.get("keep_alive_s"),
        aliases=tuple(aliases),
        defaults=_defaults(entry.get("defaults", {}), where),
        pin=entry.get("pin", False),
        warm=entry.get("warm", False),
        pulled=entry.get("pulled", False),
    )


def _defaults(table: object, where: str) -> tuple[tuple[str, float | int], ...]:
    """A model's default sampling fields, each checked as a request's own value would be."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: `defaults` must be a table of sampling fields")
    unknown = set(table) - set(DEFAULT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: `defaults` takes {sorted(DEFAULT_FIELDS)}; not {sorted(unknown)}")
    for field, value in table.items():
        low, high, integer = DEFAULT_FIELDS[field]
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            raise ValueError(f"{where}: `defaults.{field}` must be a {'whole ' if integer else ''}number")
        if not low <= value <= high:
            raise ValueError(f"{where}: `defaults.{field}` must be between {low} and {high}")
    return tuple(sorted(table.items()))


def _two_strings(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value)


_EMBEDDING_HEADS = ("Model", "ForMaskedLM", "EmbeddingModel")
"""How an embedding model's architecture is named in its config.json (BertModel, XLMRobertaModel,
ModernBertModel, Qwen3Model...), where a text generator's ends in ForCausalLM or ForConditionalGeneration."""

_GENERATOR_HEADS = ("LMHeadModel",)
"""Generators whose names end in Model all the same (GPT2LMHeadModel, GPTNeoXLMHeadModel...)."""


def kind_of(spec: ModelSpec) -> str:
    """What `spec` does: its models-file `kind`, else what its config.json's architectures say (a model
    whose files are not here yet counts as a generator until they are)."""
    if spec.kind is not None:
        return spec.kind
    directory = spec.local_files()
    if directory is None:
        return "generate"
    try:
        stamp = (directory / "config.json").stat().st_mtime_ns
    except OSError:
        return "generate"
    cached = _KINDS.get(directory)
    if cached is None or cached[0] != stamp:
        cached = _KINDS[directory] = (stamp, _kind_in(directory))
    return cached[1]


_KINDS: dict[Path, tuple[int, str]] = {}
"""A model directory's kind by its config.json's mtime: asked on every request, read once per change."""


def _kind_in(directory: Path) -> str:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return "generate"
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if (
        isinstance(architectures, list)
        and architectures
        and all(
            isinstance(a, str) and a.endswith(_EMBEDDING_HEADS) and not a.endswith(_GENERATOR_HEADS)
            for a in architectures
        )
    ):
        return "embed"
    return "generate"
