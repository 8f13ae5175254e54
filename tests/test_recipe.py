"""Recipes: every shipped recipe validates; every user mistake names the file and the dotted field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import needs_shared_data, require_shared_data

from expo_bench.errors import RecipeError
from expo_bench.recipe import apply_override, load_recipe, validate_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
LOCAL_TWINS = [
    pytest.param(path, marks=needs_shared_data() if "../shared/data" in path.read_text() else (), id=path.name)
    for path in RECIPES
]
"""Every shipped recipe; those that read the shared data folder skip where it is absent."""


def base() -> dict[str, Any]:
    return {
        "experiment": "tiny",
        "seeds": [1],
        "task": {
            "kind": "tabular",
            "prompts": [{"name": "x", "pi_star": [0.6, 0.3, 0.1], "pi_ref": [0.4, 0.4, 0.2]}],
            "draws_per_prompt": 30,
        },
        "train": {"max_epochs": 2, "batch_size": 4, "optimizer": {"name": "Adam", "lr": 0.01}},
        "lam": [0.1, 1.0],
        "methods": [{"method": "dpo"}, {"method": "expo_compositional"}, {"method": "expo_regression", "lam": [0.1, 0.5]}],
    }


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data, "my.yaml")
    assert caught.value.source == "my.yaml"
    return caught.value.problems


def test_there_are_recipes() -> None:
    assert {path.name for path in RECIPES} >= {"synthetic_interpolation.yaml", "synthetic_preservation.yaml"}


@pytest.mark.parametrize("path", LOCAL_TWINS)
def test_every_shipped_recipe_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(path.parent.parent)  # local paths in recipes are relative to the repository root
    experiment = load_recipe(path)
    assert experiment.runs and all(run.grid for run in experiment.runs)


def test_the_instances_recipe_is_the_tuned_comparison_on_three_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(RECIPES[0].parent.parent)
    tuned, instances = (
        load_recipe(Path("recipes") / name).recipe for name in ("synthetic_tokens_tuned.yaml", "synthetic_tokens_instances.yaml")
    )
    task = instances.task
    assert len(getattr(task, "instances", None) or []) >= 3 and len(instances.seeds) >= 5
    assert [entry.grid for entry in instances.methods] == [entry.grid for entry in tuned.methods]
    assert task.model_copy(update={"instances": None}) == tuned.task and instances.train == tuned.train
    assert instances.statistics.equivalence_fraction == 0.5 and instances.statistics.leave_one_seed_out


def test_statistics_settings_do_not_change_the_recipe_fingerprint() -> None:
    """They change only how the leaderboard compares, never a run: a store's sweep stays the same sweep."""
    data = yaml.safe_load((RECIPES[0].parent / "synthetic_tokens_tuned.yaml").read_text())
    first = validate_recipe(data, "a.yaml").recipe.fingerprint()
    data["statistics"] = {"equivalence_margin": 0.2, "leave_one_seed_out": True}
    assert validate_recipe(data, "a.yaml").recipe.fingerprint() == first
    data["statistics"] = {"equivalence_fraction": 0}
    with pytest.raises(RecipeError, match=r"statistics\.equivalence_fraction"):
        validate_recipe(data, "a.yaml")


def test_lambda_grid_lands_on_each_methods_own_parameter() -> None:
    experiment = validate_recipe(base(), "my.yaml")
    dpo, expo, regression = experiment.runs
    assert [p.beta for p in dpo.grid] == [0.1, 1.0]  # type: ignore[attr-defined]
    assert [p.lam for p in expo.grid] == [0.1, 1.0]  # type: ignore[attr-defined]
    assert [p.lam for p in regression.grid] == [0.1, 0.5]  # type: ignore[attr-defined]


def test_unknown_key_suggests_the_closest_one() -> None:
    data = base()
    data["methods"][1]["params"] = {"kl_scael": 0.5}
    [(path, message)] = problems(data)
    assert path == "methods[1].params.kl_scael"
    assert message.startswith(
        "unknown key 'kl_scael' (did you mean 'kl_scale'?); valid keys: gamma, length_normalize, kl_estimator,"
    )


def test_unknown_top_level_key() -> None:
    data = base()
    data["trian"] = {}
    [(path, message)] = problems(data)
    assert path == "trian" and "did you mean 'train'" in message


def test_wrong_type_names_the_field() -> None:
    data = base()
    data["train"]["max_epochs"] = "ten"
    [(path, message)] = problems(data)
    assert path == "train.max_epochs" and "integer" in message


def test_negative_lambda_is_out_of_range() -> None:
    data = base()
    data["lam"] = [0.1, -1.0]
    found = dict(problems(data))
    assert "greater than 0" in found["lam[1]"]


def test_expo_regression_lambda_above_one() -> None:
    data = base()
    data["methods"][2]["lam"] = [0.5, 1.5]
    [(path, message)] = problems(data)
    assert path == "methods[2].lam[1]" and "less than or equal to 1" in message


def test_unknown_method_suggests_a_builtin() -> None:
    data = base()
    data["methods"][1]["method"] = "expo_compositonal"
    [(path, message)] = problems(data)
    assert path == "methods[1].method" and "did you mean 'expo_compositional'" in message


def test_reference_free_method_cannot_take_a_lambda_grid() -> None:
    data = base()
    data["methods"].append({"method": "simpo"})
    [(path, message)] = problems(data)
    assert path == "lam" and "reference-free" in message


def test_every_problem_is_reported_at_once() -> None:
    data = base()
    data["methods"][0]["params"] = {"label_smoothing": 0.7}
    data["methods"][2]["train"] = {"batch_size": 0}
    paths = {path for path, _ in problems(data)}
    assert paths == {"methods[0].params.label_smoothing", "methods[2].train.batch_size"}


def test_duplicate_labels_are_rejected() -> None:
    data = base()
    data["methods"].append({"method": "dpo"})
    [(path, message)] = problems(data)
    assert path == "methods[3].label" and "used twice" in message


def test_invalid_distribution() -> None:
    data = base()
    data["task"]["prompts"][0]["pi_star"] = [0.5, 0.3, 0.1]
    [(path, message)] = problems(data)
    assert path == "task.prompts[0]" and "summing to 1" in message


def test_unknown_optimizer() -> None:
    data = base()
    data["train"]["optimizer"]["name"] = "Adamw"
    [(path, message)] = problems(data)
    assert path == "train.optimizer.name" and "did you mean 'AdamW'" in message


def test_method_train_override_merges_into_the_shared_budget() -> None:
    data = base()
    data["methods"][1]["train"] = {"optimizer": {"lr": 0.5}}
    experiment = validate_recipe(data, "my.yaml")
    assert experiment.runs[1].train.optimizer.lr == 0.5
    assert experiment.runs[1].train.optimizer.name == "Adam"
    assert experiment.runs[1].train.max_epochs == 2
    assert experiment.runs[0].train.optimizer.lr == 0.01


def test_set_overrides_by_dotted_path_with_list_indices() -> None:
    data = base()
    apply_override(data, "methods.1.params.kl_scale=0.25")
    apply_override(data, "train.optimizer.lr=1e-4")
    apply_override(data, "lam=[1, 2, 3]")
    experiment = validate_recipe(data, "my.yaml")
    assert experiment.runs[1].grid[0].kl_scale == 0.25  # type: ignore[attr-defined]
    assert experiment.runs[0].train.optimizer.lr == 1e-4
    assert experiment.runs[0].lam == [1, 2, 3]


@pytest.mark.parametrize("assignment", ["methods.7.params.x=1", "train.max_epochs.x=1", "no_equals_sign"])
def test_bad_overrides_are_user_errors(assignment: str) -> None:
    with pytest.raises(RecipeError, match="--set"):
        apply_override(base(), assignment)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("experiment: x\nmethods: [dpo\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(path) in str(caught.value) and "line 3" in str(caught.value)


def test_fingerprint_is_stable_and_content_sensitive() -> None:
    first = validate_recipe(base(), "a.yaml").recipe.fingerprint()
    assert first == validate_recipe(yaml.safe_load(yaml.safe_dump(base())), "b.yaml").recipe.fingerprint()
    changed = base()
    changed["seeds"] = [2]
    assert validate_recipe(changed, "a.yaml").recipe.fingerprint() != first


def test_a_grid_tunes_numeric_hyperparameters_as_replicas_and_train_settings_as_runs() -> None:
    data = base()
    data["methods"] = [
        {"method": "dpo", "grid": {"beta": [0.1, 1.0, 3.0], "train.optimizer.lr": [0.01, 0.03]}},
        {"method": "expo_regression", "grid": {"distance": ["bce", "squared"]}},
    ]
    runs = validate_recipe(data, "my.yaml").runs
    dpo, regression = [run for run in runs if run.label == "dpo"], [run for run in runs if run.label == "expo_regression"]
    assert [run.train.optimizer.lr for run in dpo] == [0.01, 0.03]
    assert all(run.lam == [0.1, 1.0, 3.0] for run in dpo)  # the entry's grid overrides the recipe's λ grid
    assert [[params.distance for params in run.grid] for run in regression] == [["bce", "bce"], ["squared", "squared"]]
    assert all(run.lam == [0.1, 1.0] for run in regression)  # the recipe's λ grid, for each distance


@pytest.mark.parametrize(
    ("grid", "where", "message"),
    [
        ({"betta": [0.1]}, "methods[0].grid.betta", "neither a hyperparameter of dpo (did you mean 'beta'?)"),
        ({"beta": [0.1, -1.0]}, "methods[0].grid.beta[1]", "greater than 0"),
        ({"train.optimizer.lr": [0.0]}, "methods[0].grid.train.optimizer.lr", "greater than 0"),
        ({"beta": []}, "methods[0].grid.beta", "at least one value"),
    ],
)
def test_grid_mistakes_name_the_field(grid: dict[str, Any], where: str, message: str) -> None:
    data = base()
    data["methods"] = [{"method": "dpo", "grid": grid}]
    [(path, text)] = problems(data)
    assert path == where and message in text


def hh(**task: Any) -> dict[str, Any]:
    """A local HH recipe with a tiny model (the shipped twin's shape, paths made absolute)."""
    shared = require_shared_data()
    data = yaml.safe_load(Path(__file__).parent.parent.joinpath("recipes", "hh_tiny_local.yaml").read_text())
    data["task"] |= {"source": str(shared / "hh-rlhf"), "tokenizer": str(shared / "tokenizers" / "gpt-neox-20b"), **task}
    return data


def test_a_misspelt_architecture_key_is_refused_not_defaulted() -> None:
    data = hh()
    data["task"]["model"]["tiny"]["hiden_size"] = data["task"]["model"]["tiny"].pop("hidden_size")
    [(path, message)] = problems(data)
    assert path == "task.model.tiny.hiden_size"
    assert message.startswith("unknown key 'hiden_size' for gpt_neox (did you mean 'hidden_size'?)")
    data["task"]["model"]["tiny"] = {"model_type": "gpt_neoz"}
    [(path, message)] = problems(data)
    assert path == "task.model.tiny" and "unknown model_type 'gpt_neoz' (did you mean" in message


def test_optimizer_kwargs_are_checked_against_the_optimizer() -> None:
    data = base()
    data["train"]["optimizer"]["kwargs"] = {"betass": [0.9, 0.99]}
    [(path, message)] = problems(data)
    assert path == "train.optimizer.kwargs.betass" and "for torch.optim.Adam (did you mean 'betas'?)" in message
    data["train"]["optimizer"]["kwargs"] = {"betas": [2.0, 0.99]}
    [(path, message)] = problems(data)
    assert path == "train.optimizer.kwargs" and "Invalid beta parameter at index 0" in message
    data["train"]["optimizer"]["kwargs"] = {"weight_decay": 0.1}
    data["methods"][0]["train"] = {"optimizer": {"name": "SGD", "kwargs": {"momentum": 0.9, "betas": [0.9, 0.99]}}}
    [(path, message)] = problems(data)  # a method's own override is checked too
    assert path == "methods[0].train.optimizer.kwargs.betas" and "for torch.optim.SGD" in message


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (["train", "optimizer", "lr"], float("inf")),
        (["lam"], [0.1, float("nan")]),
        (["methods", 2, "lam"], [0.1, float("inf")]),
        (["train", "optimizer", "kwargs"], {"eps": float("nan")}),
        (["train", "gradient_clip_val"], float("inf")),
    ],
)
def test_non_finite_numbers_are_refused_everywhere(where: list[Any], value: Any) -> None:
    data = base()
    node = data
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = value
    [(path, message)] = problems(data)
    assert path.startswith(".".join(str(part) for part in where[:1])) and ("finite" in message)


def test_non_finite_yaml_values_are_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(base()).replace("lr: 0.01", "lr: .inf"))
    with pytest.raises(RecipeError, match=r"train.optimizer.lr: Input should be a finite number"):
        load_recipe(recipe)


def test_a_path_shaped_model_or_tokenizer_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    for field, value in (("tokenizer", str(tmp_path / "no-tokenizer")), ("tokenizer", "../tokenizers/nowhere")):
        [(path, message)] = problems(hh(**{field: value}))
        assert path == "task.tokenizer" and f"no such file or folder: {value!r}" in message
    data = hh()
    data["task"]["model"] = {"name_or_path": "models/pythia/2.8b"}
    [(path, message)] = problems(data)
    assert path == "task.model.name_or_path" and "no such file or folder" in message
    assert validate_recipe(hh(tokenizer="EleutherAI/pythia-2.8b"), "my.yaml")  # a hub id: checked when loaded


def test_an_empty_data_file_is_refused_at_validation(tmp_path: Path) -> None:
    (tmp_path / "helpful-base").mkdir()
    (tmp_path / "helpful-base" / "test.jsonl").write_text("\n")
    [(path, message)] = problems(hh(source=str(tmp_path)))
    assert path == "task" and "test.jsonl: the file is empty" in message
    imdb = {"kind": "imdb", "source": str(tmp_path), "tokenizer": hh()["task"]["tokenizer"], "model": hh()["task"]["model"]}
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": 1}\n')
    (tmp_path / "test.jsonl").write_text("")
    [(path, message)] = problems({**base(), "task": imdb})
    assert path == "task" and "test.jsonl: the file is empty" in message


def test_set_value_that_is_not_yaml_names_the_key() -> None:
    with pytest.raises(RecipeError) as caught:
        apply_override(base(), "train.max_epochs=[1")
    [(path, message)] = caught.value.problems
    assert caught.value.source == "--set" and path == "train.max_epochs" and "is not valid YAML" in message


def test_a_recipe_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("experiment: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text: byte 0xe9 at offset 15"):
        load_recipe(recipe)
