"""What every task kind answers for the recipe and the runner, so that neither asks which kind a task is."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from expo_bench.config_model import ConfigModel
from expo_bench.metric_keys import Metric

if TYPE_CHECKING:
    from expo_bench.train_config import Machine, TrainConfig


class TaskBase(ConfigModel):
    """A recipe's ``task`` section. The defaults are a task that trains in one CPU process and reads nothing ahead."""

    rank_by: ClassVar[Metric]
    """The metric that picks a method's best configuration on the leaderboard."""
    trains_with_lightning: ClassVar[bool] = False
    """Whether its runs train through Lightning's Trainer with the recipe's hardware (else in one CPU process)."""

    def instance_count(self) -> int:
        """The task instances each seed runs on."""
        return 1

    def own_stages(self) -> list[tuple[str, TrainConfig]]:
        """Its own training stages besides the methods' (SFT), by field path."""
        return []

    def machine_problems(self, machine: Machine) -> list[tuple[str, str]]:
        """What of its own settings (the model's) cannot run on ``machine``: ``(field path, why)``."""
        return []

    def master_weights_problems(self, path: str, precision: str) -> list[tuple[str, str]]:
        """Why its model's weights cannot be master weights under the mixed ``precision`` set at ``path``."""
        return []

    def check_data(self) -> None:
        """Read its local data ahead of any work, so that a fault is a :class:`~expo_bench.errors.DataError` before
        anything is written."""

    def check_judges(self, cache_dir: Path) -> None:
        """Reach every judge it needs from outside (an LLM judge's endpoint and model) before anything trains."""
