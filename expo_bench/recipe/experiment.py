"""A validated recipe resolved into runs, and the world of processes it trains in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expo_bench.errors import RecipeError, UserError
from expo_bench.methods import MethodParams, PreferenceMethod
from expo_bench.recipe.schema import WORLD_FIELDS, Recipe
from expo_bench.train_config import Machine, TrainConfig


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
    def run_count(self) -> int:
        """The runs it trains: each configuration of each method, once per seed and task instance."""
        return self.recipe.task.instance_count() * len(self.recipe.seeds) * sum(len(run.grid) for run in self.runs)

    @property
    def stages(self) -> list[tuple[str, TrainConfig]]:
        """Every training stage that runs through Lightning's Trainer with the recipe's hardware, by field path: the
        language-model stages (SFT, each method); tabular tasks train in one CPU process whatever ``train`` says."""
        if not self.recipe.task.trains_with_lightning:
            return []
        methods = [(f"methods[{run.entry}].train", run.train) for run in self.runs]
        return [("train", self.recipe.train), *self.recipe.task.own_stages(), *methods]

    @property
    def world(self) -> World:
        train = self.recipe.train
        return World(train.accelerator, train.devices, train.num_nodes) if self.stages else SINGLE_PROCESS

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
        problems += self.recipe.task.machine_problems(machine)
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


def hardware_problems(experiment: Experiment) -> list[tuple[str, str]]:
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
    mixed = [(path, train.precision) for path, train in experiment.stages if train.precision.endswith("-mixed")]
    return problems + (experiment.recipe.task.master_weights_problems(*mixed[0]) if mixed else [])


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
