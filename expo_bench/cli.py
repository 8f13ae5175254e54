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
        ("run", run, "train and evaluate every method of a recipe; write results/<experiment>/"),
        ("validate", validate, "check a recipe (types, ranges, method names) without running it"),
    ):
        command = commands.add_parser(name, help=summary, description=summary)
        command.set_defaults(handler=handler)
        command.add_argument("recipe", type=Path, help="path to a YAML recipe, e.g. recipes/synthetic_interpolation.yaml")
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


def describe(experiment: Experiment) -> Table:
    table = Table(title=f"{experiment.recipe.experiment} ({experiment.source}, recipe {experiment.recipe.fingerprint()})")
    for column in ("label", "method", "λ grid", "params", "epochs", "batch", "optimizer"):
        table.add_column(column)
    for run in experiment.runs:
        params = run.grid[0].model_dump(exclude={run.method.regularization} if run.lam else set())
        table.add_row(
            run.label,
            f"{run.method.__module__}:{run.method.__qualname__}",
            "—" if run.lam is None else ", ".join(f"{lam:g}" for lam in run.lam),
            ", ".join(f"{k}={v}" for k, v in params.items()),
            str(run.train.max_epochs),
            str(run.train.batch_size),
            f"{run.train.optimizer.name}(lr={run.train.optimizer.lr:g})",
        )
    return table


def validate(args: argparse.Namespace, console: Console) -> None:
    console.print(describe(load_recipe(args.recipe, args.overrides)))
    console.print(Text(f"{args.recipe}: valid", style="green"))


def run(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.runner import run_experiment  # imports Lightning: keep validate and --help fast

    experiment = load_recipe(args.recipe, args.overrides)
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
