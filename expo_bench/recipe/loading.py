"""Typed recipes: load YAML, apply ``--set`` overrides, validate everything before any work starts; ``--only``.

Every problem is reported with the recipe file and the dotted field path (``methods[2].params.lam``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from expo_bench.errors import RecipeError
from expo_bench.recipe.experiment import Experiment, hardware_problems
from expo_bench.recipe.grid import resolve_entry
from expo_bench.recipe.overrides import apply_override, yaml_problem
from expo_bench.recipe.schema import Recipe, field_path, validation_problems


def validate_recipe(data: Any, source: Path | str) -> Experiment:
    """Validate a parsed recipe; raise :class:`RecipeError` listing every problem."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(source, validation_problems(error)) from None
    problems: list[tuple[str, str]] = []
    resolved = [(index, resolve_entry(recipe, index, entry, problems)) for index, entry in enumerate(recipe.methods)]
    seen: set[str] = set()
    for index, runs in resolved:
        if not runs:
            continue
        if runs[0].label in seen:
            problems.append(
                (field_path(["methods", index, "label"]), f"label {runs[0].label!r} is used twice; give each entry its own label")
            )
        seen.add(runs[0].label)
    experiment = Experiment(recipe, [run for _, runs in resolved for run in runs], Path(source))
    if not problems:  # the hardware checks index methods by their resolved runs
        problems += hardware_problems(experiment)
    if problems:
        raise RecipeError(source, problems)
    return experiment


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
    label_of = {run.entry: run.label for run in runs}
    kept = [
        index
        for index, entry in enumerate(recipe.methods)
        if "method" not in wanted or wanted["method"] & {label_of[index], entry.method}
    ]
    seeds = [seed for seed in recipe.seeds if "seed" not in wanted or str(seed) in wanted["seed"]]
    problems = []
    if not kept:
        names = ", ".join(
            dict.fromkeys(name for index, entry in enumerate(recipe.methods) for name in (label_of[index], entry.method))
        )
        problems.append(
            ("method", f"no method entry is labelled or named {', '.join(sorted(wanted['method']))}; the recipe has {names}")
        )
    if not seeds:
        problems.append(("seed", f"no seed {', '.join(sorted(wanted['seed']))} in the recipe's seeds {recipe.seeds}"))
    if problems:
        raise RecipeError(f"{experiment.source} --only", problems)
    selected = recipe.model_copy(update={"seeds": seeds, "methods": [recipe.methods[index] for index in kept]})
    renumbered = [replace(run, entry=kept.index(run.entry)) for run in runs if run.entry in kept]
    return Experiment(selected, renumbered, experiment.source)


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Experiment:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, [("", "no such recipe file")])
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RecipeError(
            path, [("", f"not UTF-8 text: byte {error.object[error.start]:#04x} at offset {error.start}")]
        ) from None
    except OSError as error:
        raise RecipeError(path, [("", f"cannot read the file ({error.strerror})")]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(path, [(where, f"not valid YAML: {yaml_problem(error)}")]) from None
    if not isinstance(data, dict):
        raise RecipeError(path, [("", "a recipe is a YAML mapping (experiment:, task:, methods:, ...)")])
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_recipe(data, path)
