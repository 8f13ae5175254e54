"""``expo-bench``: run and validate benchmark recipes, build the leaderboard, browse runs in the MLflow UI."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from expo_bench import __version__
from expo_bench.errors import Interrupted, UserError
from expo_bench.metric_keys import LEADERBOARD_COLUMNS
from expo_bench.reporting import rich_table

if TYPE_CHECKING:
    from expo_bench.recipe import Experiment
    from expo_bench.sweep.claims import SweepShare

EXIT_USER_ERROR = 2
RUNS = Path("runs")
"""Where a user's runs go by default: git-ignored, apart from the committed reference results (``--results results``)."""
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
"""Write failures that are the machine's, not a bug: reported in one line, like a user error."""
DISK_FULL = re.compile(r"No space left on device|database or disk is full|Disk quota exceeded")
"""A full disk as libraries that do not raise an ``OSError`` for it say so (SQLite under MLflow, safetensors)."""
CONFIRM_RUNS = 10_000
"""The most runs ``run`` starts without asking: a grid of a thousand values per axis is a million runs."""
RESUME = "rerun the same command to resume it (finished work and the last checkpoint are kept)"

QUIET_LIBRARIES = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." on every new store
    "TRANSFORMERS_VERBOSITY": "error",  # tokenizer notices on every load
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # the long phases show their own progress
}
"""Library chatter kept off the terminal (read by each library when it is imported; a value already set wins)."""


EXAMPLES = """examples:
  expo-bench recipes                      shipped recipes, one line each
  expo-bench methods                      methods, what λ sets, hyperparameters
  expo-bench schema task.preference       a section's fields, defaults, meaning
  expo-bench validate RECIPE --print-config
  expo-bench run RECIPE --only method=dpo --only seed=0 --set train.max_epochs=2
  expo-bench leaderboard EXPERIMENT       the leaderboard again, from the store
  expo-bench data fetch                   the files the local twins read, into ../shared/data"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expo-bench",
        description="Reproducible benchmark for offline preference optimization (EXPO, DPO, IPO,\n"
        "SimPO, ...): every method of a recipe trained, evaluated and recorded alike.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"expo-bench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, handler, summary in (
        ("run", run, "train and evaluate every method of each recipe; write runs/<experiment>/"),
        ("validate", validate, "check a recipe (types, ranges, method names) without running it"),
        ("submit", submit, "run a recipe's sweep as SLURM jobs through submitit: prepare, a job array of runs, the report"),
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
        command.add_argument(
            "--only",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="keep only these method entries (method=LABEL or method name) or seeds (seed=N); repeatable, "
            "comma-separated alternatives, e.g. --only method=dpo,ipo --only seed=0",
        )
        command.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved recipe (every default filled in) as YAML and exit",
        )
        if name == "submit":
            command.add_argument("--results", type=Path, default=RUNS, help="results root (default: runs/)")
            command.add_argument("--allow-dirty", action="store_true", help="as for run")
            command.add_argument("--workers", type=int, default=8, metavar="N", help="runs trained at once (default: 8)")
            command.add_argument(
                "--cluster",
                choices=["slurm", "local"],
                default="slurm",
                help="slurm (default), or local: submitit's local executor, each stage waited for, on this machine",
            )
            command.add_argument("--partition", help="SLURM partition")
            command.add_argument("--timeout-min", type=int, default=240, help="each job's time limit (default: 240)")
            command.add_argument("--cpus-per-task", type=int, default=8, help="CPUs each job takes (default: 8)")
            command.add_argument(
                "--gpus-per-run",
                type=int,
                default=None,
                help="GPUs each job takes (default: the recipe's train.devices on GPUs, else 0)",
            )
            command.add_argument("--mem-gb", type=int, default=None, help="memory each job takes (default: the partition's)")
        elif name == "run":
            command.add_argument(
                "--results",
                type=Path,
                default=RUNS,
                help="results root (default: runs/, git-ignored; --results results regenerates the committed reference results)",
            )
            command.add_argument(
                "--allow-dirty",
                action="store_true",
                help="write into a results folder that git tracks even though the code has uncommitted changes "
                "(refused otherwise: committed results must regenerate from a commit); recorded in summary.json",
            )
            command.add_argument(
                "--workers",
                type=int,
                default=1,
                metavar="N",
                help="share a language-model recipe's runs among N worker processes on this machine, each with its share "
                "of the CPU threads or its own GPU(s); the same numbers as one process (default: 1, this process)",
            )
            # one stage of a shared-out sweep, as the pool and expo-bench submit start it (see expo_bench.pool)
            command.add_argument("--stage", choices=["all", "prepare", "work"], default="all", help=argparse.SUPPRESS)
            command.add_argument("--claims", type=Path, default=None, help=argparse.SUPPRESS)
            command.add_argument("--worker-name", default="worker", help=argparse.SUPPRESS)
            command.add_argument("--max-runs", type=int, default=None, help=argparse.SUPPRESS)
            command.add_argument(
                "--yes",
                action="store_true",
                help=f"start a plan of more than {CONFIRM_RUNS:,} runs without asking (asked on a terminal, else refused)",
            )
        else:
            command.add_argument(
                "--any-machine",
                action="store_true",
                help="check the recipe alone, not whether this machine can run it (GPUs, DeepSpeed, precision): "
                "for a recipe meant for another machine",
            )
    for name, handler, summary in (
        ("methods", methods, "list the built-in methods: what λ sets, hyperparameters and their defaults"),
        ("recipes", recipes, "list the shipped recipes (recipes/), one line each"),
    ):
        commands.add_parser(name, help=summary, description=summary).set_defaults(handler=handler)
    schema = commands.add_parser(
        "schema",
        help="every recipe field with its default, type and meaning, as commented YAML",
        description="Print the recipe's fields as commented YAML (defaults, types, bounds, documentation). SECTION is a "
        "dotted path: train, task (lists the task kinds), task.hh, task.preference.evaluation.judge.llm, ...",
    )
    schema.set_defaults(handler=show_schema)
    schema.add_argument("section", nargs="?", default="", metavar="SECTION", help="e.g. train, task.hh.evaluation")
    data = commands.add_parser(
        "data",
        help="fetch the public files the local twins and the tests read (needs the hub)",
        description="fetch: HH-RLHF's test splits, IMDb and the Pythia and GPT-2 tokenizers from the Hugging Face hub "
        "into a data folder (default ../shared/data, the folder the shipped recipes name); files already there are kept.",
    )
    data.set_defaults(handler=fetch_data)
    data.add_argument("action", choices=["fetch"], help="fetch the missing files")
    data.add_argument("--to", type=Path, default=None, metavar="DIR", help="the data folder (default: ../shared/data)")
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
    board.add_argument(
        "--equivalence-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="equivalence (TOST) margin against the best row: F × the best row's gap to the baseline (default: 0.5)",
    )
    board.add_argument(
        "--equivalence-margin", type=float, metavar="M", help="an absolute TOST margin in the rank metric's units instead"
    )
    board.add_argument(
        "--leave-one-seed-out",
        action="store_true",
        help="also report the rank metric when each seed's configuration is picked on the other seeds' selection metric",
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
    ui_command.add_argument(
        "--allow-writes",
        action="store_true",
        help="let the UI (and anyone who reaches it) create, edit and delete runs (default: read-only)",
    )
    server_command = commands.add_parser(
        "server",
        help="serve the results root's tracking store to sweeps on other processes and nodes (MLflow tracking server)",
        description="Start an MLflow tracking server over RESULTS/mlflow.db with its artifacts in RESULTS/mlartifacts, "
        "for sweeps whose jobs run on several nodes (expo-bench submit): they record through it, never into the SQLite "
        "file. Ctrl-C stops it.",
    )
    server_command.set_defaults(handler=server)
    server_command.add_argument("--results", type=Path, default=RUNS, help="results root (default: runs/)")
    server_command.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    server_command.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for jobs on other nodes)",
    )
    for command in (board, ui_command):
        command.add_argument(
            "--results", type=Path, default=RUNS, help="results root, home of the default store (default: runs/)"
        )
        command.add_argument(
            "--tracking-uri",
            metavar="URI",
            help="MLflow tracking URI, as a recipe's tracking.uri (default: $MLFLOW_TRACKING_URI, else sqlite:///RESULTS/mlflow.db)",
        )
    return parser


def lam_summary(lams: list[float] | None) -> str:
    """The distinct λ values of a run's replicas (a grid over other hyperparameters repeats them)."""
    if lams is None:
        return "—"
    distinct = list(dict.fromkeys(lams))
    return (
        ", ".join(f"{lam:g}" for lam in distinct)
        if len(distinct) <= 3
        else f"{len(distinct)}: {min(distinct):g}…{max(distinct):g}"
    )


def _values(values: list[object]) -> str:
    distinct = list(dict.fromkeys(values))
    text = [f"{value:.4g}" if isinstance(value, float) else str(value) for value in distinct]
    return text[0] if len(text) == 1 else "{" + ", ".join(text) + "}"


def _flat(settings: dict[str, object], prefix: str = "") -> dict[str, object]:
    """``{"optimizer": {"lr": 1e-3}}`` → ``{"optimizer.lr": 1e-3}``."""
    flat: dict[str, object] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe(experiment: Experiment, width: int | None = None) -> Table:
    """One row per method run: what will be trained, with which λ grid, the other hyperparameters that are not
    defaults (a set where the grid varies them) and where its budget differs from the recipe's (so that runs a grid
    over ``train.`` settings split apart differ in that column, not only in columns a narrow terminal leaves out),
    then the budget."""
    recipe = experiment.recipe
    shared_budget = _flat(recipe.train.model_dump(mode="json"))
    rows = []
    for run in experiment.runs:
        dumps = [params.model_dump(exclude={run.method.regularization or ""}) for params in run.grid]
        defaults = run.method.Params().model_dump()
        varying = {key: [dump[key] for dump in dumps] for key in dumps[0]}
        shown = {
            key: values for key, values in varying.items() if len(set(map(str, values))) > 1 or values[0] != defaults.get(key)
        }
        budget = {
            key: value for key, value in _flat(run.train.model_dump(mode="json")).items() if shared_budget.get(key) != value
        }
        rows.append(
            [
                run.label,
                lam_summary(run.lam),
                ", ".join(
                    [
                        *(f"{key}={_values(values)}" for key, values in shown.items()),
                        *(f"{key}={_values([value])}" for key, value in budget.items()),
                    ]
                )
                or "—",
                str(run.train.max_epochs),
                str(run.train.batch_size),
                f"{run.train.optimizer.name} {run.train.optimizer.lr:g}",
            ]
        )
    header = ["method", "λ", "other params", "epochs", "batch", "optimizer"]
    configurations = sum(len(run.grid) for run in experiment.runs)
    seeds = len(recipe.seeds)
    count = experiment.recipe.task.instance_count()
    instances = f" × {count} task instances" if count > 1 else ""
    runs = f"{experiment.run_count:,} runs ({configurations:,} configurations × {seeds} seed{'s' * (seeds != 1)}{instances})"
    title = f"{recipe.experiment} · recipe {recipe.fingerprint()} · seeds {recipe.seeds} · {runs}"
    return rich_table(title, header, rows, width, "--print-config", required=3, wrap=[2])  # what tells the rows apart stays


def load(args: argparse.Namespace) -> list[Experiment]:
    """Every recipe on the command line, overridden, validated and selected, before any work starts."""
    from expo_bench.recipe import load_recipe, select

    return [select(load_recipe(path, args.overrides), args.only) for path in args.recipes]


def print_config(experiments: list[Experiment], console: Console) -> None:
    from expo_bench.explain import resolved_yaml

    for experiment in experiments:
        console.print(f"# {experiment.source}, resolved", style="dim", highlight=False)
        console.print(resolved_yaml(experiment), end="", highlight=False, markup=False, soft_wrap=True)


def validate(args: argparse.Namespace, console: Console) -> None:
    experiments = load(args)
    if args.print_config:
        print_config(experiments, console)
        return
    from expo_bench.train_config import Machine

    machine = None if args.any_machine else Machine.this()
    for experiment in experiments:
        if machine is not None:
            experiment.check_machine(machine)
        experiment.recipe.task.check_data()
        console.print(describe(experiment, console.width))
        console.print(Text(f"{experiment.source}: valid" + ("" if machine is None else " on this machine"), style="green"))


def writable(folder: Path) -> None:
    """:class:`UserError` unless files can be created under ``folder`` (checked where it, or its nearest existing parent,
    is; the probe file is removed again)."""
    for existing in [folder.absolute(), *folder.absolute().parents]:
        try:
            existing.stat()
        except FileNotFoundError:
            if existing.is_symlink():
                raise UserError(f"cannot write results under {folder}: {existing} is a symbolic link to nothing") from None
            continue
        except OSError as error:  # a symbolic link loop
            raise UserError(f"cannot write results under {folder}: {existing}: {error.strerror}; pass --results") from None
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as error:
            raise UserError(
                f"cannot write results under {folder}: {existing}: {error.strerror or error}; pass --results"
            ) from None
        return


def confirm_size(experiments: list[Experiment], yes: bool, console: Console) -> None:
    """:class:`UserError` for a plan of more than :data:`CONFIRM_RUNS` runs (a grid's size multiplies fast) unless
    ``yes``, or the user agrees on a terminal."""
    runs = sum(experiment.run_count for experiment in experiments)
    if runs <= CONFIRM_RUNS or yes:
        return
    question = f"{runs:,} runs is more than {CONFIRM_RUNS:,}: start them?"
    if sys.stdin.isatty():
        if console.input(Text(f"{question} [y/N] ")).strip().lower() in ("y", "yes"):
            return
        raise UserError(f"not started: {runs:,} runs ({', '.join(str(experiment.source) for experiment in experiments)})")
    raise UserError(f"{question} Pass --yes to start them, or shrink the grid or select with --only")


def run(args: argparse.Namespace, console: Console) -> None:
    experiments = load(args)  # all valid before any work
    if args.print_config:
        print_config(experiments, console)
        return
    confirm_size(experiments, args.yes, console)
    from expo_bench.runner import (  # imports Lightning: keep validate and --help fast
        git_revision,
        preflight,
        refuse_dirty_overwrite,
        run_experiment,
        start_ranks,
    )
    from expo_bench.tracking import check_store, resolve_tracking_uri
    from expo_bench.train_config import Machine

    machine = Machine.this()
    revision = git_revision(Path(__file__).parent)
    for experiment in experiments:  # runnable here, and the places they write writable, before anything is written
        experiment.check_machine(machine)
        experiment.recipe.task.check_data()
        writable(args.results / experiment.recipe.experiment)
        refuse_dirty_overwrite(args.results / experiment.recipe.experiment, revision, args.allow_dirty)
        check_store(resolve_tracking_uri(experiment.recipe.tracking.uri, args.results))
        preflight(experiment, args.results)  # every recipe's judge answers before the first one trains
    share = sweep_share(args, experiments)
    if args.workers > 1:
        from expo_bench.pool import run_arguments, run_with_workers, slices_for

        slices = [slices_for(experiment, args.workers, machine) for experiment in experiments]
        for experiment, shares in zip(experiments, slices, strict=True):
            console.print(describe(experiment, console.width))
            arguments = run_arguments(experiment.source, args.overrides, args.only, args.results, args.allow_dirty)
            run_with_workers(experiment, arguments, args.results, console, shares, args.allow_dirty)
        return
    start_ranks(experiments, console)
    for experiment in experiments:
        console.print(describe(experiment, console.width))
        run_experiment(experiment, args.results, console, args.allow_dirty, share)


def submit(args: argparse.Namespace, console: Console) -> None:
    experiments = load(args)
    if len(experiments) != 1:
        raise UserError("expo-bench submit takes one recipe")
    (experiment,) = experiments
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: pass how many runs may train at once, 1 or more")
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from expo_bench.cluster import JobSettings
    from expo_bench.cluster import submit as submit_jobs
    from expo_bench.pool import require_shareable, run_arguments

    require_shareable(experiment, "expo-bench submit")

    world = experiment.world
    on_gpus = world.accelerator in ("gpu", "cuda") and isinstance(world.devices, int)
    gpus = args.gpus_per_run if args.gpus_per_run is not None else (world.devices if on_gpus else 0)
    settings = JobSettings(args.cluster, args.timeout_min, args.cpus_per_task, int(gpus), args.partition, args.mem_gb)
    arguments = run_arguments(experiment.source.absolute(), args.overrides, args.only, args.results.absolute(), args.allow_dirty)
    console.print(describe(experiment, console.width))
    try:
        jobs = submit_jobs(experiment, arguments, args.results, args.workers, settings, console)
    except (FailedJobError, UncompletedJobError) as error:
        raise UserError(f"a job of the sweep failed: {str(error).strip().splitlines()[0]}; the same command resumes it") from None
    out = args.results / experiment.recipe.experiment
    if args.cluster == "slurm":
        console.print(f"queued {len(jobs)} jobs; the leaderboard lands in {out} when job {jobs[-1]} ends", soft_wrap=True)
    else:
        console.print(f"every job finished; the leaderboard is in {out}", soft_wrap=True)


def sweep_share(args: argparse.Namespace, experiments: list[Experiment]) -> SweepShare:
    """The part of the sweep this process does: all of it, unless a pool or a cluster job started it as one stage."""
    from expo_bench.sweep.claims import Claims, SweepShare

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: pass a number of worker processes, 1 or more")
    if args.stage == "all":
        return SweepShare()
    if args.workers > 1:
        raise UserError("--workers starts the stages itself: leave out --stage")
    if len(experiments) != 1:
        raise UserError("--stage shares out the runs of one recipe")
    from expo_bench.pool import require_shareable

    require_shareable(experiments[0], f"--stage {args.stage}")
    if args.stage == "work" and args.claims is None:
        raise UserError("--stage work needs --claims FOLDER, shared by the workers of one sweep")
    claims = None if args.claims is None else Claims(args.claims, args.worker_name)
    return SweepShare(args.stage, claims, args.max_runs)


def methods(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.explain import methods_text

    console.print(methods_text(), highlight=False, markup=False, soft_wrap=True)


def recipes(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.explain import recipes_text

    console.print(recipes_text(width=console.width), highlight=False, markup=False, soft_wrap=True)


def show_schema(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.explain import schema_text

    console.print(schema_text(args.section), highlight=False, markup=False, soft_wrap=True)


def fetch_data(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.datafiles import DEFAULT_FOLDER, fetch

    fetch(args.to or DEFAULT_FOLDER, console)


def leaderboard(args: argparse.Namespace, console: Console) -> None:
    from pydantic import ValidationError

    from expo_bench.comparison_settings import StatisticsConfig
    from expo_bench.leaderboard import load_leaderboard, write_leaderboard  # imports MLflow and matplotlib
    from expo_bench.tracking import resolve_tracking_uri

    try:
        settings = StatisticsConfig(
            equivalence_fraction=args.equivalence_fraction,
            equivalence_margin=args.equivalence_margin,
            leave_one_seed_out=args.leave_one_seed_out,
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise UserError(f"expo-bench leaderboard --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    uri = resolve_tracking_uri(args.tracking_uri, args.results)
    tables = load_leaderboard(uri, args.experiment, args.baseline, settings)
    written = write_leaderboard(tables, args.results / (args.experiment or "leaderboard"), console)
    console.print(f"wrote {', '.join(str(path) for path in written)}")


def loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (every address it resolves to is a loopback address); ``""`` and ``0``
    are every interface."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(address).split("%")[0]).is_loopback for address in addresses)


def ui(args: argparse.Namespace, console: Console) -> None:
    from expo_bench.tracking import LEADERBOARD_VIEW, leaderboard_views, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(args.tracking_uri, args.results)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking store {uri} is a server with its own UI: open it in a browser")
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UserError(f"no tracking store at {database} (URI {uri}): run a recipe first (expo-bench run RECIPE)")
    free_port(args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    for name, experiment_id in leaderboard_views(uri).items():  # URLs on one line each, never folded: they are clicked
        console.print(f"{name}: {url}/#/experiments/{experiment_id}?viewStateShareKey={LEADERBOARD_VIEW}", soft_wrap=True)
    server_module = "mlflow" if args.allow_writes else "expo_bench.ui_server"  # ui_server: mlflow server, read-only
    command = [sys.executable, "-m", server_module, *(["server"] if args.allow_writes else [])]
    changes = "and change the tracking store (--allow-writes)" if args.allow_writes else "the tracking store (read-only)"
    serve([*command, "--backend-store-uri", uri], args.host, args.port, f"MLflow UI over {uri}", changes, console)


def server(args: argparse.Namespace, console: Console) -> None:
    """A tracking server for sweeps whose processes run apart (``expo-bench submit``): the results root's SQLite store and
    its artifacts, served over HTTP by this one process, so no worker touches the file itself."""
    from expo_bench.tracking import TRACKING_URI_VARIABLE, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(None, args.results)
    database = sqlite_path(uri)
    assert database is not None
    database.parent.mkdir(parents=True, exist_ok=True)
    free_port(args.host, args.port)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::', '') else args.host}:{args.port}"
    console.print(f"record sweeps here: --set tracking.uri={url}, or {TRACKING_URI_VARIABLE}={url}", soft_wrap=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--artifacts-destination", str((args.results / "mlartifacts").absolute())]
    serve(command, args.host, args.port, f"MLflow tracking server over {uri}", "and change the tracking store", console)


def free_port(host: str, port: int) -> None:
    """:class:`UserError` unless ``host:port`` can be listened on."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except (OSError, OverflowError) as error:
            raise UserError(f"cannot listen on {host}:{port} ({error}): pass another --port") from error


def serve(command: list[str], host: str, port: int, what: str, reach: str, console: Console) -> None:
    """Run an MLflow server ``command`` on ``host:port`` until Ctrl-C or SIGTERM, its messages in a log file; warn when
    it listens beyond this machine (anyone who reaches it can browse ``reach``)."""
    if not loopback(host):
        Console(stderr=True).print(
            Text("warning: ", style="bold yellow")
            + Text(f"listening on {host or 'every interface'!r}, beyond this machine: anyone who can reach it can browse {reach}")
        )
    url = f"http://{host}:{port}"
    log = Path(tempfile.gettempdir()) / f"expo-bench-server-{port}.log"
    with log.open("w") as chatter:  # the server's own messages (gunicorn/uvicorn, migrations) go to a file
        process = subprocess.Popen(
            [*command, "--host", host, "--port", str(port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job-runner processes
            stdout=chatter,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: all of it can be killed if it does not stop when asked
        )
    console.print(f"{what}: {url} (Ctrl-C stops it; the server's messages: {log})", soft_wrap=True)
    stopping: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        process.send_signal(signum)  # mlflow server passes it on to its workers

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        status = process.wait()
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        try:
            status = process.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # hung, or Ctrl-C again: stop all of it now
            os.killpg(process.pid, signal.SIGKILL)
            status = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status != 0 and not stopping:
        raise UserError(f"the MLflow server exited with status {status}: see its messages in {log}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""What a scheduler (SLURM, Kubernetes) or a closed terminal sends to stop a run."""


def _interrupt(signum: int, frame: object) -> None:
    """Stop at once with :class:`Interrupted`, except inside a Lightning ``Trainer`` call: Lightning installs its own
    SIGTERM handler (calling this one after it) and stops at the next batch boundary with ``SIGTERMException``, so a
    checkpoint is never cut mid-write."""
    if signal.getsignal(signum) is _interrupt:
        raise Interrupted(signum)


def interruption(error: BaseException) -> int | None:
    """The signal that stopped the run, if ``error`` is how a stop request surfaced: :class:`Interrupted`, Ctrl-C,
    Lightning's ``SIGTERMException`` (a ``SystemExit`` without a code) or the ``sys.exit(1)`` by which Lightning ends a
    ``Trainer`` call on Ctrl-C."""
    if isinstance(error, Interrupted):
        return error.signum
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if lightning is not None and isinstance(error, lightning.SIGTERMException):
        return signal.SIGTERM
    if isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt):
        return interruption(error.__context__)
    return None


def environment_failure(error: BaseException) -> str | None:
    """One line for a failure that is the machine's, not a bug (a full disk, a read-only or forbidden folder), wherever
    it surfaced: an ``OSError`` anywhere in the chain of exceptions (cleanups on a full disk fail too), or a library's
    words for a full disk."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in ENVIRONMENT_ERRNOS:
            full = f"; free some space, then {RESUME}" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            return (f"{cause.filename}: " if cause.filename else "") + f"{cause.strerror}{full}"
        if match := DISK_FULL.search(str(cause)):
            return f"{match.group(0)} ({type(cause).__name__}); free some space, then {RESUME}"
        cause = cause.__cause__ or cause.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    stops = () if args.handler in (ui, server) else STOP_SIGNALS  # these forward them to their MLflow server
    previous = {signum: signal.signal(signum, _interrupt) for signum in stops}
    try:
        args.handler(args, Console())
    except (KeyboardInterrupt, SystemExit) as error:
        signum = interruption(error)
        if signum is None:
            raise
        resume = f"; {RESUME}" if args.command == "run" else ""
        Console(stderr=True).print(
            Text("interrupted: ", style="bold red") + Text(f"{signal.Signals(signum).name} stopped the {args.command}{resume}")
        )
        return 128 + signum
    except UserError as error:
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(str(error)))
        return EXIT_USER_ERROR
    except Exception as error:
        message = environment_failure(error)
        if message is None:
            raise
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(message))
        return EXIT_USER_ERROR
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
