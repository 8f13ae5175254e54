"""A method entry resolved into runs: its class, its λ and grid points, its budget, every problem named by field."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import yaml
from pydantic import ValidationError

from expo_bench.config_model import closest
from expo_bench.methods import MethodParams, UnknownMethodError, default_label, method_class
from expo_bench.recipe.experiment import MethodRun
from expo_bench.recipe.overrides import apply_override, deep_merge
from expo_bench.recipe.schema import MethodEntry, Recipe, field_path, validation_problems
from expo_bench.train_config import TrainConfig

TRAIN_PREFIX = "train."


def _points(grid: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every combination of a grid's values, in the order the keys and values are listed."""
    return (dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values()))


def resolve_entry(recipe: Recipe, index: int, entry: MethodEntry, problems: list[tuple[str, str]]) -> list[MethodRun]:
    """Entry ``index`` of the recipe's methods as runs; what is wrong with it is appended to ``problems`` (no runs then)."""
    where: list[int | str] = ["methods", index]
    try:
        method = method_class(entry.method)
    except UnknownMethodError as error:
        problems.append((field_path([*where, "method"]), str(error)))
        return []
    lam, lam_path = (entry.lam, [*where, "lam"]) if entry.lam is not None else (recipe.lam, ["lam"])
    grid = dict(entry.grid)
    if entry.lam is not None and method.regularization in grid:
        problems.append((field_path([*where, "lam"]), f"the grid sets {method.regularization} too; keep one of them"))
        return []
    if lam is not None and method.regularization not in grid:
        if method.regularization is None:
            problems.append(
                (field_path(lam_path), f"{entry.method} has no regularization parameter to sweep (it is reference-free)")
            )
            return []
        grid = {method.regularization: lam, **grid}
    fields = set(method.Params.model_fields)
    before = len(problems)
    for key, choices in grid.items():
        if key in entry.params:
            problems.append((field_path([*where, "params", key]), "set by a grid (lam or grid); remove it here or there"))
        elif key not in fields and not key.startswith(TRAIN_PREFIX):
            hint = closest(key, sorted(fields))
            message = (
                f"{key!r} is neither a hyperparameter of {entry.method}{hint} ({', '.join(sorted(fields))}) nor a train. setting"
            )
            problems.append((field_path([*where, "grid", key]), message))
        elif not choices:
            problems.append((field_path([*where, "grid", key]), "give at least one value"))
    if len(problems) > before:
        return []
    runs: dict[str, tuple[TrainConfig, list[MethodParams]]] = {}
    trains: dict[str, tuple[TrainConfig, str]] = {}  # by the point's train settings: validated once, not per point
    for point in _points(grid):
        settings = {key: value for key, value in point.items() if key.startswith(TRAIN_PREFIX)}
        settings_key = json.dumps(settings, sort_keys=True) if settings else ""
        if settings_key not in trains:
            overrides: dict[str, Any] = {}
            for key, value in settings.items():
                apply_override(overrides, f"{key.removeprefix(TRAIN_PREFIX)}={yaml.safe_dump(value)}")
            try:
                train = TrainConfig.model_validate(deep_merge(deep_merge(recipe.train.model_dump(), entry.train), overrides))
            except ValidationError as error:
                problems.extend(validation_problems(error, [*where, "grid", "train"] if overrides else [*where, "train"]))
                return []
            trains[settings_key] = train, json.dumps(train.model_dump(mode="json"), sort_keys=True)
        train, train_key = trains[settings_key]
        chosen = {key: value for key, value in point.items() if not key.startswith(TRAIN_PREFIX)}
        try:
            params = method.Params.model_validate({**entry.params, **chosen})
        except ValidationError as error:
            for item in error.errors():
                name = str(item["loc"][0]) if item["loc"] else ""
                location: list[int | str]
                if name in chosen:
                    position = grid[name].index(chosen[name])
                    from_lam = lam is not None and name == method.regularization and name not in entry.grid
                    location = [*lam_path, position] if from_lam else [*where, "grid", name, position]
                else:
                    location = [*where, "params", *item["loc"]]
                if item["type"] == "unknown_key":
                    location.append(item["ctx"]["key"])
                problems.append((field_path(location), item["msg"]))
            return []
        # replicas may differ only in numeric hyperparameters: anything else starts another run
        fixed = {key: value for key, value in params.model_dump(mode="json").items() if not _numeric(value)}
        runs.setdefault(train_key + json.dumps(fixed, sort_keys=True), (train, []))[1].append(params)
    resolved = [
        MethodRun(entry.label or default_label(method), method, replicas, train, index) for train, replicas in runs.values()
    ]
    missing = method.requires(resolved[0].grid[0]) - recipe.task.provides()
    if missing:
        problems.append(
            (
                field_path(where),
                f"{entry.method} with these params needs {', '.join(sorted(missing))} in its batches, "
                f"which task kind {recipe.task.kind!r} does not provide here "
                "(for EXPO on language models: set task.reference_samples, or kl_estimator: dataset_responses)",
            )
        )
        return []
    if not method.takes_margin and any(params.gamma for run in resolved for params in run.grid):
        problems.append(
            (field_path([*where, "params", "gamma"]), f"{entry.method} defines its own objective, which takes no margin gamma")
        )
        return []
    return resolved


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
