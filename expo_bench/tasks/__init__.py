"""What a task is: its recipe section and its data. A recipe's ``task.kind`` picks one member of :data:`Task`."""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import Field

from expo_bench.tasks.hh import HHTask
from expo_bench.tasks.imdb import IMDbTask
from expo_bench.tasks.language_model import LanguageModelTask
from expo_bench.tasks.preference import PreferenceTask
from expo_bench.tasks.synthetic_tokens import SyntheticTokensTask
from expo_bench.tasks.tabular import TabularTask

TaskUnion = TabularTask | SyntheticTokensTask | HHTask | IMDbTask | PreferenceTask
Task = Annotated[TaskUnion, Field(discriminator="kind")]
TASK_KINDS = {get_args(task.model_fields["kind"].annotation)[0] for task in get_args(TaskUnion)}

__all__ = [
    "TASK_KINDS",
    "HHTask",
    "IMDbTask",
    "LanguageModelTask",
    "PreferenceTask",
    "SyntheticTokensTask",
    "TabularTask",
    "Task",
    "TaskUnion",
]
