from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ModelNotFound
from shared.models import ModelRegistry
from shared.settings import Settings


def registry(tmp_path: Path, text: str) -> ModelRegistry:
    models_file = tmp_path / "models.toml"
    models_file.write_text(text)
    return ModelRegistry.from_settings(Settings(models_file=models_file, data_dir=tmp_path / "data"))


def test_demo_is_built_in_and_other_models_come_from_the_file(tmp_path: Path) -> None:
    models = registry(tmp_path, '[models.coder]\nrepo = "mlx-community/some-model"\nnotes = "coding"\n')
    assert [m.name for m in models.all()] == ["coder", "demo"]
    assert models.get("coder").repo == "mlx-community/some-model"
    assert models.get("demo").builtin


def test_an_unknown_model_is_model_not_found_listing_the_known_ones(tmp_path: Path) -> None:
    models = registry(tmp_path, "")
    with pytest.raises(ModelNotFound, match="known: demo"):
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
        ('[models.demo]\nrepo = "b"\n', "built in"),
    ],
)
def test_a_malformed_models_file_is_refused_naming_the_entry(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        registry(tmp_path, text)


def test_an_alias_names_a_model_for_clients_with_a_fixed_default_name(tmp_path: Path) -> None:
    models = registry(tmp_path, '[aliases]\n"gpt-5.6-luna" = "demo"\n')
    assert models.get("gpt-5.6-luna").name == "demo"
    with pytest.raises(ValueError, match="not a model here"):
        registry(tmp_path, '[aliases]\n"gpt-4.1" = "nope"\n')
    with pytest.raises(ValueError, match="already a model"):
        registry(tmp_path, '[aliases]\n"demo" = "demo"\n')


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

