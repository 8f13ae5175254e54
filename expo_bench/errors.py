"""User-facing errors: each names the file, the field and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input; the CLI prints it without a traceback and exits with status 2."""


class RecipeError(UserError):
    """One or more problems in a recipe, each as (dotted field path, message)."""

    def __init__(self, source: Path | str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = str(source)
        self.problems = list(problems)
        lines = [f"{path}: {message}" if path else message for path, message in self.problems]
        super().__init__(f"{self.source}: invalid recipe\n  " + "\n  ".join(lines))


class DataError(UserError):
    """A data file or source that cannot be read as the task expects; the message names it."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM, SIGHUP) outside a Lightning ``Trainer`` call; every cleanup that runs
    on Ctrl-C runs on it too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
