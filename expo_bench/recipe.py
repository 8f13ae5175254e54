"""Typed recipes: load YAML, apply ``--set`` overrides, validate everything before any work starts.

Every problem is reported with the recipe file and the dotted field path (``methods[2].params.lam``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from expo_bench.comparison_settings import StatisticsConfig
from expo_bench.config_model import ConfigModel, closest
from expo_bench.errors import RecipeError, UserError
from expo_bench.methods import MethodParams, PreferenceMethod, UnknownMethodError, default_label, method_class
from expo_bench.tasks import TASK_KINDS, LanguageModelTask, Task
from expo_bench.training import Machine, TrainConfig

WORLD_FIELDS = ("accelerator", "devices", "num_nodes")
"""The fields of a training stage that say which processes it runs in: one world for every stage of a recipe."""


class MethodEntry(ConfigModel):
    """One method to train: a built-in name or an import path ``package.module:Class``.

    ``params`` are the method's hyperparameters (validated by its ``Params``); ``lam`` overrides the
    recipe's λ grid; ``train`` overrides parts of the recipe's ``train`` section; ``grid`` tunes the method on the
    product of the listed values, each key a hyperparameter or a ``train.`` setting (``train.optimizer.lr``).
    """

    method: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    lam: list[float] | None = Field(None, min_length=1)
    train: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


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
    baseline_method: str | None = "dpo"
    """The method label the leaderboard pairs every row with (per-seed differences); null for none."""
    statistics: StatisticsConfig = StatisticsConfig()
    """How the leaderboard compares methods: the equivalence margin, leave-one-seed-out selection."""
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _sft_in_the_recipes_world(cls, data: Any) -> Any:
        """A task's SFT stage trains on the recipe's ``accelerator``, ``devices`` and ``num_nodes`` unless it names its own."""
        if not isinstance(data, dict) or not isinstance(data.get("task"), dict) or not isinstance(data["task"].get("sft"), dict):
            return data
        train = data["train"] if isinstance(data.get("train"), dict) else {}
        world = {field: train[field] for field in WORLD_FIELDS if field in train}
        return {**data, "task": {**data["task"], "sft": {**world, **data["task"]["sft"]}}}

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    def fingerprint(self) -> str:
        """sha256 of the validated recipe (defaults filled in; where it is tracked and how the leaderboard compares aside:
        neither changes a run), the same for equal content."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"tracking", "statistics"}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MethodRun:
    """Part of a method entry resolved: its class, one parameter set per replica (they differ in numeric values only,
    so a tabular task trains them at once), and its budget. An entry with a grid of settings that cannot vary across
    replicas (``train.*``, non-numeric hyperparameters) resolves into one run per such setting, all with its label."""

    label: str
    method: type[PreferenceMethod]
    grid: list[MethodParams]
    train: TrainConfig
    entry: int
    """Its entry's index in the recipe's ``methods`` (an entry with a grid of training settings gives several runs)."""

    @property
    def lam(self) -> list[float] | None:
        """The paper's λ of each replica: the value of the method's regularization field (None: it has none)."""
        field = self.method.regularization
        return None if field is None else [float(getattr(params, field)) for params in self.grid]


@dataclass(frozen=True)
class World:
    """The processes a recipe trains in: ``num_nodes`` × ``devices`` of ``accelerator``."""

    accelerator: str
    devices: int | str
    num_nodes: int


SINGLE_PROCESS = World("cpu", 1, 1)


@dataclass(frozen=True)
class Experiment:
    recipe: Recipe
    runs: list[MethodRun]
    source: Path

    @property
    def instance_count(self) -> int:
        """The task instances each seed runs on (several: the synthetic-token task with ``instances``)."""
        task = self.recipe.task
        return len(task.task_instances()) if isinstance(task, LanguageModelTask) else 1

    @property
    def run_count(self) -> int:
        """The runs it trains: each configuration of each method, once per seed and task instance."""
        return self.instance_count * len(self.recipe.seeds) * sum(len(run.grid) for run in self.runs)

    @property
    def stages(self) -> list[tuple[str, TrainConfig]]:
        """Every training stage that runs through Lightning's Trainer with the recipe's hardware, by field path: the
        language-model stages (SFT, each method); tabular tasks train in one CPU process whatever ``train`` says."""
        task = self.recipe.task
        if not isinstance(task, LanguageModelTask):
            return []
        stages = [("train", self.recipe.train)]
        if task.sft is not None:
            stages.append(("task.sft", task.sft))
        return stages + [(f"methods[{run.entry}].train", run.train) for run in self.runs]

    @property
    def world(self) -> World:
        train = self.recipe.train
        return World(train.accelerator, train.devices, train.num_nodes) if self.stages else SINGLE_PROCESS

    def check_data(self) -> None:
        """Read the task's local data ahead of any work: a fault is a DataError naming the file, line and field."""
        if isinstance(self.recipe.task, LanguageModelTask):
            self.recipe.task.check_data()

    def check_machine(self, machine: Machine) -> None:
        """Refuse, naming the fields, what cannot run on ``machine`` (devices, strategy, precision, attention), before
        any work starts."""
        problems, inherited = [], set(self.recipe.train.machine_problems(machine))
        for path, train in self.stages:
            found = train.machine_problems(machine)
            # a method's budget inherits the recipe's: name a problem where it was set
            problems += [
                (f"{path}.{field}", message)
                for field, message in found
                if path == "train" or not path.startswith("methods") or (field, message) not in inherited
            ]
        task = self.recipe.task
        if isinstance(task, LanguageModelTask):
            problems += [
                (f"task.model.{field}", message) for field, message in task.model.machine_problems(machine.gpus, machine.packages)
            ]
        if problems:
            raise RecipeError(self.source, list(dict.fromkeys(problems)))


ONE_PROCESS: dict[str, tuple[Any, ...]] = {
    "accelerator": ("auto", "cpu"),
    "devices": ("auto", 1),
    "num_nodes": (1,),
    "strategy": ("auto",),
}
"""The hardware settings a task that trains in one CPU process (tabular) accepts: anything else would be ignored."""


def _one_process_problems(experiment: Experiment) -> list[tuple[str, str]]:
    """Hardware settings a tabular task would ignore, named where they are set (a method inherits the recipe's)."""
    recipe_train = experiment.recipe.train
    budgets = [("train", recipe_train)] + [(f"methods[{run.entry}].train", run.train) for run in experiment.runs]
    return [
        (f"{path}.{field}", f"{value!r}: a {experiment.recipe.task.kind} task trains in one CPU process; leave {field} unset")
        for path, train in budgets
        for field, accepted in ONE_PROCESS.items()
        if (value := getattr(train, field)) not in accepted and (path == "train" or value != getattr(recipe_train, field))
    ]


def _hardware_problems(experiment: Experiment) -> list[tuple[str, str]]:
    """One world for every stage, and fp32 master weights under mixed precision; a task that trains in one process
    takes no hardware settings."""
    if not experiment.stages:
        return _one_process_problems(experiment)
    problems = []
    world = experiment.world
    for path, train in experiment.stages:
        for field in WORLD_FIELDS:
            if getattr(train, field) != getattr(world, field):
                problems.append(
                    (
                        f"{path}.{field}",
                        f"{getattr(train, field)!r} differs from train.{field} {getattr(world, field)!r}: every stage trains "
                        "in the one world of processes the run starts in",
                    )
                )
    task = experiment.recipe.task
    mixed = [(path, train.precision) for path, train in experiment.stages if train.precision.endswith("-mixed")]
    if isinstance(task, LanguageModelTask) and mixed and task.model.dtype != "float32":
        path, precision = mixed[0]
        problems.append(
            (
                "task.model.dtype",
                f"{task.model.dtype} master weights under {path}.precision {precision}: mixed precision keeps float32 "
                "master weights (set float32, or a -true precision to train in 16 bits throughout)",
            )
        )
    return problems


def common_world(experiments: Sequence[Experiment]) -> World:
    """The world that every recipe of one command trains in; recipes that need different ones are refused."""
    worlds = {experiment.world for experiment in experiments}
    if len(worlds) > 1:
        raise UserError(
            "these recipes train in different worlds of processes ("
            + "; ".join(f"{experiment.source}: {experiment.world}" for experiment in experiments)
            + "): run them one command each"
        )
    return worlds.pop()


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


def _yaml_problem(error: yaml.YAMLError) -> str:
    return str(getattr(error, "problem", None) or error)


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
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise RecipeError("--set", [(key, f"value {raw!r} is not valid YAML ({_yaml_problem(error)})")]) from None
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            raise RecipeError("--set", [(key, f"no list item {leaf!r} (the list has {len(node)})")])
        node[int(leaf)] = value
    else:
        node[leaf] = value


TRAIN_PREFIX = "train."


def _points(grid: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every combination of a grid's values, in the order the keys and values are listed."""
    return (dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values()))


def _resolve(recipe: Recipe, index: int, entry: MethodEntry, problems: list[tuple[str, str]]) -> list[MethodRun]:
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
                problems.extend(_problems(error, [*where, "grid", "train"] if overrides else [*where, "train"]))
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


def validate_recipe(data: Any, source: Path | str) -> Experiment:
    """Validate a parsed recipe; raise :class:`RecipeError` listing every problem."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(source, _problems(error)) from None
    problems: list[tuple[str, str]] = []
    resolved = [(index, _resolve(recipe, index, entry, problems)) for index, entry in enumerate(recipe.methods)]
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
        problems += _hardware_problems(experiment)
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
        raise RecipeError(path, [(where, f"not valid YAML: {_yaml_problem(error)}")]) from None
    if not isinstance(data, dict):
        raise RecipeError(path, [("", "a recipe is a YAML mapping (experiment:, task:, methods:, ...)")])
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_recipe(data, path)
