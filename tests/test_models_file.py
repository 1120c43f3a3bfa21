from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import ModelNotFound
from shared.models import ModelRegistry, ModelSpec, kind_of
from shared.settings import Settings


def registry(tmp_path: Path, text: str) -> ModelRegistry:
    models_file = tmp_path / "models.toml"
    models_file.write_text(text)
    return ModelRegistry.from_settings(Settings(models_file=models_file, data_dir=tmp_path / "data"))


def test_demo_and_tiny_are_built_in_and_other_models_come_from_the_file(tmp_path: Path) -> None:
    models = registry(tmp_path, '[models.coder]\nrepo = "mlx-community/some-model"\nnotes = "coding"\n')
    assert [m.name for m in models.all()] == ["coder", "demo", "embed", "tiny"]
    assert models.get("coder").repo == "mlx-community/some-model"
    assert models.get("tiny").builtin and models.get("demo").builtin


def test_an_unknown_model_is_model_not_found_listing_the_known_ones(tmp_path: Path) -> None:
    models = registry(tmp_path, "")
    with pytest.raises(ModelNotFound, match="known: demo, embed, tiny"):
        models.get("llama")


def test_a_missing_local_path_is_reported_by_name(tmp_path: Path) -> None:
    models = registry(tmp_path, '[models.gone]\npath = "does/not/exist"\n')
    problem = models.get("gone").problem()
    assert problem is not None
    assert str(tmp_path / "does/not/exist") in problem


def test_relative_paths_are_relative_to_the_models_file(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    models = registry(tmp_path, '[models.local]\npath = "weights"\n')
    assert models.get("local").path == tmp_path / "weights"
    assert models.get("local").problem() is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[models.x]\npath = "a"\nrepo = "b"\n', "exactly one"),
        ("[models.x]\nnotes = 'no source'\n", "exactly one"),
        ('[models.x]\nrepo = "b"\ncolour = "red"\n', "unknown keys"),
        ('[models.tiny]\nrepo = "b"\n', "built in"),
    ],
)
def test_a_malformed_models_file_is_refused_naming_the_entry(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        registry(tmp_path, text)


def test_an_alias_names_a_model_for_clients_with_a_fixed_default_name(tmp_path: Path) -> None:
    models = registry(tmp_path, '[aliases]\n"gpt-5.6-luna" = "tiny"\n')
    assert models.get("gpt-5.6-luna").name == "tiny"
    with pytest.raises(ValueError, match="not a model here"):
        registry(tmp_path, '[aliases]\n"gpt-4.1" = "nope"\n')
    with pytest.raises(ValueError, match="already a model"):
        registry(tmp_path, '[aliases]\n"tiny" = "tiny"\n')


def test_reasoning_markers_and_template_arguments_per_model(tmp_path: Path) -> None:
    models = registry(
        tmp_path,
        '[models.r1]\nrepo = "x/r1"\nreasoning = ["<think>", "</think>"]\n'
        '[models.qwen3]\nrepo = "x/q"\nreasoning = false\nchat_template_kwargs = {enable_thinking = false}\n',
    )
    assert models.get("r1").reasoning == ("<think>", "</think>")
    assert models.get("qwen3").reasoning is False
    assert dict(models.get("qwen3").chat_template_kwargs) == {"enable_thinking": False}
    with pytest.raises(ValueError, match="reasoning"):
        registry(tmp_path, '[models.bad]\nrepo = "x/b"\nreasoning = "yes"\n')


def test_a_model_carries_its_aliases_defaults_pin_and_warm(tmp_path: Path) -> None:
    models = registry(
        tmp_path,
        '[models.coder]\nrepo = "team/coder"\naliases = ["gpt-4.1", "claude-x"]\npin = true\nwarm = true\n'
        "defaults = {temperature = 0.6, max_tokens = 4096}\n",
    )
    spec = models.get("gpt-4.1")
    assert spec.name == "coder" and spec.pin and spec.warm
    assert dict(spec.defaults) == {"temperature": 0.6, "max_tokens": 4096}
    assert models.get("claude-x") is spec


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("defaults = {temperature = 3.0}", "defaults.temperature` must be between"),
        ("defaults = {max_tokens = 1.5}", "defaults.max_tokens` must be a whole number"),
        ("defaults = {mirostat = 1}", "`defaults` takes"),
        ('pin = "yes"', "`pin` must be true or false"),
        ("aliases = [1]", "`aliases` must be a list of names"),
        ('repo = "no-owner"', "owner/name"),
    ],
)
def test_a_models_new_fields_are_checked_like_a_requests(tmp_path: Path, entry: str, complaint: str) -> None:
    source = "" if entry.startswith("repo") else 'repo = "team/x"\n'
    with pytest.raises(ValueError, match=complaint):
        registry(tmp_path, f"[models.x]\n{source}{entry}\n")


def test_stored_entries_lie_over_the_files_and_a_broken_one_is_skipped(tmp_path: Path) -> None:
    models_file = tmp_path / "models.toml"
    models_file.write_text('[models.coder]\nrepo = "team/coder"\nnotes = "from the file"\n')
    stored = {"coder": {"pin": True}, "added": {"path": str(tmp_path)}, "broken": {"pin": "no", "repo": "a/b"}}
    models = ModelRegistry.from_settings(Settings(models_file=models_file, data_dir=tmp_path / "d"), stored)
    coder = models.get("coder")
    assert coder.pin and coder.notes == "from the file" and coder.repo == "team/coder"
    assert models.get("added").path == tmp_path
    assert models.find("broken") is None


def test_a_registry_replaced_in_place_is_seen_by_whoever_holds_it(tmp_path: Path) -> None:
    held = registry(tmp_path, "")
    held.replace(registry(tmp_path, '[models.new]\nrepo = "team/new"\naliases = ["n"]\n'))
    assert held.get("n").name == "new"


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(300, 300.0), ("300", 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("-1", -1.0), ("250ms", 0.25), (0, 0.0)],
)
def test_ollama_keep_alive_takes_seconds_or_a_duration(given: str | int, seconds: float) -> None:
    from gateway.ollama.shapes import duration_s

    assert duration_s(given, "keep_alive") == seconds


def test_a_keep_alive_that_is_no_duration_names_the_field() -> None:
    from gateway.ollama.shapes import duration_s
    from shared.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="keep_alive") as caught:
        duration_s("soon", "keep_alive")
    assert caught.value.param == "keep_alive"


@pytest.mark.parametrize(
    ("architectures", "kind"),
    [
        (["BertModel"], "embed"),
        (["Qwen3Model"], "embed"),
        (["XLMRobertaForMaskedLM"], "embed"),
        (["LlamaForCausalLM"], "generate"),
        (["GPT2LMHeadModel"], "generate"),
        (["GPTNeoXLMHeadModel"], "generate"),
    ],
)
def test_a_models_kind_is_what_its_config_names(tmp_path: Path, architectures: list[str], kind: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": architectures}))
    assert kind_of(ModelSpec("m", path=tmp_path)) == kind
