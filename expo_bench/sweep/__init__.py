"""How a recipe's (seed × method × hyperparameters) runs are fitted, resumed, evaluated and recorded: one module
per task family, each a :class:`Sweep`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from expo_bench.sweep.context import SweepContext
from expo_bench.sweep.language_model import LanguageModelSweep
from expo_bench.sweep.records import RunRecord
from expo_bench.sweep.tabular import TabularSweep
from expo_bench.tasks import LanguageModelTask, TabularTask


class Sweep(Protocol):
    def run(self) -> Sequence[RunRecord]:
        """Train, evaluate and record every run; one record per run."""
        ...

    def report(self, records: Any, out_dir: Path) -> list[Path]:
        """Write the family's tables and plots of ``records`` (what :meth:`run` returned) into ``out_dir``."""
        ...


SWEEPS: dict[type, Callable[[SweepContext, Any], Sweep]] = {
    TabularTask: TabularSweep,
    LanguageModelTask: LanguageModelSweep,
}
"""Task family (a task class or a base of it) → its sweep."""


def sweep_for(context: SweepContext) -> Sweep:
    """The sweep of the recipe's task: the entry of its class or nearest base in :data:`SWEEPS`."""
    task = context.experiment.recipe.task
    family = next(cls for cls in type(task).__mro__ if cls in SWEEPS)
    return SWEEPS[family](context, task)


__all__ = ["SWEEPS", "Sweep", "SweepContext", "sweep_for"]
