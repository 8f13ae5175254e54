"""Typed recipes: load YAML, apply ``--set`` overrides, validate everything before any work starts.

Every problem is reported with the recipe file and the dotted field path (``methods[2].params.lam``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from expo_bench.config_model import ConfigModel
from expo_bench.errors import RecipeError
from expo_bench.methods import MethodParams, PreferenceMethod, UnknownMethodError, default_label, method_class
from expo_bench.tasks import TASK_KINDS, Task
from expo_bench.training import TrainConfig


class MethodEntry(ConfigModel):
    """One method to train: a built-in name or an import path ``package.module:Class``.

    ``params`` are the method's hyperparameters (validated by its ``Params``); ``lam`` overrides the
    recipe's λ grid; ``train`` overrides parts of the recipe's ``train`` section.
    """

    method: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    lam: list[float] | None = Field(None, min_length=1)
    train: dict[str, Any] = Field(default_factory=dict)


class TrackingConfig(ConfigModel):
    """Where runs are recorded (``tracking:`` in a recipe)."""

    uri: str | None = None
    """An MLflow tracking URI (``sqlite:///path.db``, ``http://host:5000``); default ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<results>/mlflow.db``."""


class Recipe(ConfigModel):
    """A benchmark: one task, the methods to compare on it, one budget, seeds and a λ grid."""

    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    task: Task
    train: TrainConfig = TrainConfig()
    lam: list[float] | None = Field(None, min_length=1)
    """The paper's λ, applied to each method's regularization parameter (DPO's β, IPO's τ, EXPO's λ)."""
    methods: list[MethodEntry] = Field(min_length=1)
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    def fingerprint(self) -> str:
        """sha256 of the validated recipe (defaults filled in; where it is tracked aside), the same for equal content."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"tracking"}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MethodRun:
    """A method entry resolved: its class, one parameter set per λ (replica), and its budget."""

    label: str
    method: type[PreferenceMethod]
    grid: list[MethodParams]
    lam: list[float] | None
    train: TrainConfig


@dataclass(frozen=True)
class Experiment:
    recipe: Recipe
    runs: list[MethodRun]
    source: Path


def field_path(location: Sequence[int | str]) -> str:
    """``('methods', 2, 'params')`` -> ``methods[2].params``."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _problems(error: ValidationError, prefix: Sequence[int | str] = ()) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        location = [*prefix, *item["loc"]]
        if location[:1] == ["task"] and len(location) > 1 and location[1] in TASK_KINDS:
            del location[1]  # pydantic names the union member; the recipe does not
        if item["type"] == "unknown_key":
            location.append(item["ctx"]["key"])
        problems.append((field_path(location), item["msg"]))
    return problems


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (value parsed as YAML; numeric segments index lists) in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError("--set", [(assignment, "expected dotted.key=value")])
    *parents, leaf = key.split(".")
    node: Any = data
    for depth, part in enumerate(parents):
        where = ".".join(parents[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError("--set", [(where, f"no list item {part!r} (the list has {len(node)})")])
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError("--set", [(where, f"is a value, not a section: cannot set {key}")])
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            raise RecipeError("--set", [(key, f"no list item {leaf!r} (the list has {len(node)})")])
        node[int(leaf)] = value
    else:
        node[leaf] = value


def _resolve(recipe: Recipe, index: int, entry: MethodEntry, problems: list[tuple[str, str]]) -> MethodRun | None:
    where: list[int | str] = ["methods", index]
    try:
        method = method_class(entry.method)
    except UnknownMethodError as error:
        problems.append((field_path([*where, "method"]), str(error)))
        return None
    try:
        train = TrainConfig.model_validate(deep_merge(recipe.train.model_dump(), entry.train))
    except ValidationError as error:
        problems.extend(_problems(error, [*where, "train"]))
        train = recipe.train
    lam, lam_path = (entry.lam, [*where, "lam"]) if entry.lam is not None else (recipe.lam, ["lam"])
    grid: list[MethodParams] = []
    if lam is not None and method.regularization is None:
        problems.append((field_path(lam_path), f"{entry.method} has no regularization parameter to sweep (it is reference-free)"))
        return None
    if lam is not None and method.regularization in entry.params:
        problems.append(
            (field_path([*where, "params", method.regularization]), "set by the λ grid; remove it here or drop the grid")
        )
        return None
    for k, value in enumerate(lam or [None]):
        params = entry.params if value is None else {**entry.params, str(method.regularization): value}
        try:
            grid.append(method.Params.model_validate(params))
        except ValidationError as error:
            for item in error.errors():
                from_grid = value is not None and item["loc"] == (method.regularization,)
                location = [*lam_path, k] if from_grid else [*where, "params", *item["loc"]]
                if item["type"] == "unknown_key":
                    location.append(item["ctx"]["key"])
                problems.append((field_path(location), item["msg"]))
            return None
    missing = method.requires(grid[0]) - recipe.task.provides()
    if missing:
        problems.append(
            (
                field_path(where),
                f"{entry.method} with these params needs {', '.join(sorted(missing))} in its batches, "
                f"which task kind {recipe.task.kind!r} does not provide here "
                "(for EXPO on language models: set task.reference_samples, or kl_estimator: dataset_responses)",
            )
        )
        return None
    if not method.takes_margin and any(params.gamma for params in grid):
        problems.append(
            (field_path([*where, "params", "gamma"]), f"{entry.method} defines its own objective, which takes no margin gamma")
        )
        return None
    return MethodRun(entry.label or default_label(method), method, grid, lam, train)


def validate_recipe(data: Any, source: Path | str) -> Experiment:
    """Validate a parsed recipe; raise :class:`RecipeError` listing every problem."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(source, _problems(error)) from None
    problems: list[tuple[str, str]] = []
    resolved = [(index, run) for index, entry in enumerate(recipe.methods) if (run := _resolve(recipe, index, entry, problems))]
    seen: set[str] = set()
    for index, run in resolved:
        if run.label in seen:
            problems.append(
                (field_path(["methods", index, "label"]), f"label {run.label!r} is used twice; give each entry its own label")
            )
        seen.add(run.label)
    if problems:
        raise RecipeError(source, problems)
    return Experiment(recipe, [run for _, run in resolved], Path(source))


SELECTORS = ("method", "seed")
"""What ``--only KEY=VALUE`` selects by: a method entry (its label or method name) and a seed."""


def select(experiment: Experiment, only: Sequence[str]) -> Experiment:
    """The experiment restricted to the method entries and seeds named by ``KEY=VALUE[,VALUE...]`` items
    (repeatable; values of one key are alternatives). Run directories do not depend on the selection, so a
    later full run reuses what a selected run trained."""
    wanted: dict[str, set[str]] = {}
    for item in only:
        key, sep, values = item.partition("=")
        if not sep or key not in SELECTORS or not values:
            raise RecipeError("--only", [(item, f"expected KEY=VALUE with KEY one of {', '.join(SELECTORS)}")])
        wanted.setdefault(key, set()).update(value.strip() for value in values.split(","))
    recipe, runs = experiment.recipe, experiment.runs
    kept = [
        index
        for index, (entry, run) in enumerate(zip(recipe.methods, runs, strict=True))
        if "method" not in wanted or wanted["method"] & {run.label, entry.method}
    ]
    seeds = [seed for seed in recipe.seeds if "seed" not in wanted or str(seed) in wanted["seed"]]
    problems = []
    if not kept:
        names = ", ".join(
            dict.fromkeys(name for entry, run in zip(recipe.methods, runs, strict=True) for name in (run.label, entry.method))
        )
        problems.append(
            ("method", f"no method entry is labelled or named {', '.join(sorted(wanted['method']))}; the recipe has {names}")
        )
    if not seeds:
        problems.append(("seed", f"no seed {', '.join(sorted(wanted['seed']))} in the recipe's seeds {recipe.seeds}"))
    if problems:
        raise RecipeError(f"{experiment.source} --only", problems)
    selected = recipe.model_copy(update={"seeds": seeds, "methods": [recipe.methods[index] for index in kept]})
    return Experiment(selected, [runs[index] for index in kept], experiment.source)


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Experiment:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, [("", "no such recipe file")])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(path, [(where, f"not valid YAML: {getattr(error, 'problem', error)}")]) from None
    if not isinstance(data, dict):
        raise RecipeError(path, [("", "a recipe is a YAML mapping (experiment:, task:, methods:, ...)")])
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_recipe(data, path)
