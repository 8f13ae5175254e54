"""``expo-bench``: run and validate benchmark recipes, build the leaderboard, browse runs in the MLflow UI."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from expo_bench import __version__
from expo_bench.errors import UserError
from expo_bench.metric_keys import LEADERBOARD_COLUMNS
from expo_bench.recipe import Experiment, load_recipe
from expo_bench.training import Machine

EXIT_USER_ERROR = 2
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
"""Write failures that are the machine's, not a bug: reported in one line, like a user error."""


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
        else:
            command.add_argument(
                "--any-machine",
                action="store_true",
                help="check the recipe alone, not whether this machine can run it (GPUs, DeepSpeed, precision): "
                "for a recipe meant for another machine",
            )
    board = commands.add_parser(
        "leaderboard",
        help="tables and plots of the best configuration per method, from the tracking store",
        description="Build the leaderboard from the complete runs in the tracking store: per dataset, each method's best "
        "configuration by its rank metric, metrics as mean ± 95% CI over seeds. Writes leaderboard.md, leaderboard.csv "
        "and leaderboard-*.png into RESULTS/EXPERIMENT/ (RESULTS/leaderboard/ for every experiment).",
    )
    board.set_defaults(handler=leaderboard)
    board.add_argument(
        "experiment", nargs="?", metavar="EXPERIMENT", help="a recipe's experiment: name (default: every experiment in the store)"
    )
    board.add_argument(
        "--baseline", default="dpo", metavar="METHOD", help="the method every row is paired with, seed by seed (default: dpo)"
    )
    ui_command = commands.add_parser(
        "ui",
        help="browse the tracking store in the MLflow UI (http://127.0.0.1:5000)",
        description="Start the MLflow UI over the tracking store; Ctrl-C stops it. Sweeps save a view named "
        "'leaderboard' per experiment (its URL is printed): the runs table with the leaderboard metrics, "
        f"sorted by the rank metric; or add them under Columns: {', '.join(column.key for column in LEADERBOARD_COLUMNS)}.",
    )
    ui_command.set_defaults(handler=ui)
    ui_command.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui_command.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, this machine only)")
    for command in (board, ui_command):
        command.add_argument(
            "--results", type=Path, default=Path("results"), help="results root, home of the default store (default: results/)"
        )
        command.add_argument(
            "--tracking-uri",
            metavar="URI",
            help="MLflow tracking URI, as a recipe's tracking.uri (default: $MLFLOW_TRACKING_URI, else sqlite:///RESULTS/mlflow.db)",
        )
    return parser


def lam_summary(lams: list[float] | None) -> str:
    if lams is None:
        return "—"
    return ", ".join(f"{lam:g}" for lam in lams) if len(lams) <= 3 else f"{len(lams)}: {min(lams):g}…{max(lams):g}"


def _values(values: list[object]) -> str:
    distinct = list(dict.fromkeys(values))
    text = [f"{value:.4g}" if isinstance(value, float) else str(value) for value in distinct]
    return text[0] if len(text) == 1 else "{" + ", ".join(text) + "}"


def describe(experiment: Experiment) -> Table:
    """One row per method run: what will be trained, with which λ grid, the other hyperparameters that are not
    defaults (a set where the grid varies them) and the budget."""
    recipe = experiment.recipe
    table = Table(title=f"{recipe.experiment} · recipe {recipe.fingerprint()} · seeds {recipe.seeds}")
    for column in ("method", "λ", "other params", "epochs", "batch", "optimizer"):
        table.add_column(column, overflow="fold")
    for run in experiment.runs:
        dumps = [params.model_dump(exclude={run.method.regularization or ""}) for params in run.grid]
        defaults = run.method.Params().model_dump()
        varying = {key: [dump[key] for dump in dumps] for key in dumps[0]}
        shown = {
            key: values for key, values in varying.items() if len(set(map(str, values))) > 1 or values[0] != defaults.get(key)
        }
        table.add_row(
            run.label,
            lam_summary(run.lam),
            ", ".join(f"{key}={_values(values)}" for key, values in shown.items()) or "—",
            str(run.train.max_epochs),
            str(run.train.batch_size),
            f"{run.train.optimizer.name} {run.train.optimizer.lr:g}",
        )
    return table


def validate(args: argparse.Namespace, console: Console) -> None:
    machine = None if args.any_machine else Machine.this()
    for path in args.recipes:
        experiment = load_recipe(path, args.overrides)
        if machine is not None:
            experiment.check_machine(machine)
        console.print(describe(experiment))
        console.print(Text(f"{path}: valid" + ("" if machine is None else " on this machine"), style="green"))


def writable(folder: Path) -> None:
    """:class:`UserError` unless files can be created under ``folder`` (checked where it, or its nearest existing parent,
    is; the probe file is removed again)."""
    existing = next(path for path in [folder.absolute(), *folder.absolute().parents] if path.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UserError(f"cannot write results under {folder}: {existing}: {error.strerror or error}; pass --results") from None


def run(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.runner import run_experiment, start_ranks  # imports Lightning: keep validate and --help fast
    from expo_bench.tracking import check_store, resolve_tracking_uri

    experiments = [load_recipe(path, args.overrides) for path in args.recipes]  # all valid before any work
    machine = Machine.this()
    for experiment in experiments:  # runnable here, and the places they write writable, before anything is written
        experiment.check_machine(machine)
        writable(args.results / experiment.recipe.experiment)
        check_store(resolve_tracking_uri(experiment.recipe.tracking.uri, args.results))
    start_ranks(experiments, console)
    for experiment in experiments:
        console.print(describe(experiment))
        run_experiment(experiment, args.results, console)


def leaderboard(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.leaderboard import load_leaderboard, write_leaderboard  # imports MLflow and matplotlib
    from expo_bench.tracking import resolve_tracking_uri

    tables = load_leaderboard(resolve_tracking_uri(args.tracking_uri, args.results), args.experiment, args.baseline)
    written = write_leaderboard(tables, args.results / (args.experiment or "leaderboard"), console)
    console.print(f"wrote {', '.join(str(path) for path in written)}")


def ui(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.tracking import LEADERBOARD_VIEW, leaderboard_views, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(args.tracking_uri, args.results)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking store {uri} is a server with its own UI: open it in a browser")
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UserError(f"no tracking store at {database} (URI {uri}): run a recipe first (expo-bench run RECIPE)")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port in TIME_WAIT is free
        try:
            probe.bind((args.host, args.port))
        except (OSError, OverflowError) as error:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({error}): pass another --port") from error
    url = f"http://{args.host}:{args.port}"
    for name, experiment_id in leaderboard_views(uri).items():
        console.print(f"{name}: {url}/#/experiments/{experiment_id}?viewStateShareKey={LEADERBOARD_VIEW}")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host]
    server = subprocess.Popen(
        [*command, "--port", str(args.port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job-runner processes: the UI only reads
        start_new_session=True,  # its own process group: all of it can be killed if it does not stop when asked
    )
    console.print(f"MLflow UI over {uri}: {url} (Ctrl-C stops it)")
    stopping: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        server.send_signal(signum)  # mlflow server passes it on to its workers

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        status = server.wait()
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        try:
            status = server.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # hung, or Ctrl-C again: stop all of it now
            os.killpg(server.pid, signal.SIGKILL)
            status = server.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status != 0 and not stopping:
        raise UserError(f"the MLflow server exited with status {status}: see its messages above")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args, Console())
    except UserError as error:
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(str(error)))
        return EXIT_USER_ERROR
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(f"{where}{error.strerror}"))
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
