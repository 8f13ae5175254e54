"""The recipe's schema: the sections of a recipe file, validated field by field."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from expo_bench.comparison_settings import StatisticsConfig
from expo_bench.config_model import ConfigModel
from expo_bench.tasks import TASK_KINDS, Task
from expo_bench.train_config import TrainConfig

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


def field_path(location: Sequence[int | str]) -> str:
    """``('methods', 2, 'params')`` -> ``methods[2].params``."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validation_problems(error: ValidationError, prefix: Sequence[int | str] = ()) -> list[tuple[str, str]]:
    """Each of pydantic's errors as (dotted field path, message), the task kind's union member left out."""
    problems = []
    for item in error.errors():
        location = [*prefix, *item["loc"]]
        if location[:1] == ["task"] and len(location) > 1 and location[1] in TASK_KINDS:
            del location[1]  # pydantic names the union member; the recipe does not
        if item["type"] == "unknown_key":
            location.append(item["ctx"]["key"])
        problems.append((field_path(location), item["msg"]))
    return problems
