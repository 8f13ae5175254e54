"""Recipes: every shipped recipe validates; every user mistake names the file and the dotted field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from expo_bench.errors import RecipeError
from expo_bench.recipe import apply_override, load_recipe, validate_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


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


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_every_shipped_recipe_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(path.parent.parent)  # local paths in recipes are relative to the repository root
    experiment = load_recipe(path)
    assert experiment.runs and all(run.grid for run in experiment.runs)


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
