"""``expo-bench``: run and validate benchmark recipes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from expo_bench import __version__
from expo_bench.errors import UserError
from expo_bench.recipe import Experiment, load_recipe

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expo-bench",
        description="Reproducible benchmark for offline preference optimization (EXPO, DPO, IPO, SimPO, ...).",
        epilog="Example: expo-bench run recipes/synthetic_interpolation.yaml --set train.max_epochs=100",
    )
    parser.add_argument("--version", action="version", version=f"expo-bench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, handler, summary in (
        ("run", run, "train and evaluate every method of each recipe; write results/<experiment>/"),
        ("validate", validate, "check a recipe (types, ranges, method names) without running it"),
    ):
        command = commands.add_parser(name, help=summary, description=summary)
        command.set_defaults(handler=handler)
        command.add_argument(
            "recipes", type=Path, nargs="+", metavar="RECIPE", help="YAML recipe(s), e.g. recipes/synthetic_interpolation.yaml"
        )
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe field by dotted path, value parsed as YAML (repeatable), e.g. methods.0.params.beta=0.5",
        )
        if name == "run":
            command.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results/)")
    return parser


def lam_summary(lams: list[float] | None) -> str:
    if lams is None:
        return "—"
    return ", ".join(f"{lam:g}" for lam in lams) if len(lams) <= 3 else f"{len(lams)}: {min(lams):g}…{max(lams):g}"


def describe(experiment: Experiment) -> Table:
    """One row per method: what will be trained, with which λ grid, non-default hyperparameters and budget."""
    recipe = experiment.recipe
    table = Table(title=f"{recipe.experiment} · recipe {recipe.fingerprint()} · seeds {recipe.seeds}")
    for column in ("method", "λ", "other params", "epochs", "batch", "optimizer"):
        table.add_column(column, overflow="fold")
    for run in experiment.runs:
        params = run.grid[0].model_dump(exclude_defaults=True, exclude={run.method.regularization or ""})
        table.add_row(
            run.label,
            lam_summary(run.lam)
            if run.lam or run.method.regularization is None
            else f"{run.method.regularization}={getattr(run.grid[0], run.method.regularization):g}",
            ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items())
            or "—",
            str(run.train.max_epochs),
            str(run.train.batch_size),
            f"{run.train.optimizer.name} {run.train.optimizer.lr:g}",
        )
    return table


def validate(args: argparse.Namespace, console: Console) -> None:
    for path in args.recipes:
        console.print(describe(load_recipe(path, args.overrides)))
        console.print(Text(f"{path}: valid", style="green"))


def run(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.runner import run_experiment  # imports Lightning: keep validate and --help fast

    experiments = [load_recipe(path, args.overrides) for path in args.recipes]  # all valid before any work
    for experiment in experiments:
        console.print(describe(experiment))
        run_experiment(experiment, args.results, console)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args, Console())
    except UserError as error:
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(str(error)))
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
