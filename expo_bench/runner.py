"""Runs an experiment: its sweep trains, evaluates and reports; the runner records provenance in summary.json and
builds the leaderboard."""

from __future__ import annotations

import json
import platform
import subprocess
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from expo_bench import tracking
from expo_bench.distributed import is_global_zero, start_world
from expo_bench.errors import UserError
from expo_bench.leaderboard import load_leaderboard, write_leaderboard
from expo_bench.recipe import Experiment, common_world
from expo_bench.sweep import SweepContext, sweep_for
from expo_bench.sweep.claims import SweepShare
from expo_bench.sweep.records import RunRecord

EXPECTED_WARNINGS = (
    ".*does not have many workers.*",  # tabular data is built in the main process on purpose
    ".*no `val_dataloader`.*",  # the tabular task has no held-out pairs: its policies are compared with π* exactly
    ".*smaller than the logging interval.*",
    ".*module\\(s\\) in eval mode.*",  # the frozen reference is in eval mode on purpose
    ".*overridden `transfer_batch_to_device`.*",  # PreferenceBatch.to() moves the batch contract
    ".*treespec.*",  # a deprecation inside Lightning itself
    ".*switching to use `NO_SHARD`.*",  # FSDP in a world of one process: nothing to shard
    ".*DeepSpeed handles gradient clipping internally.*",  # it clips by its config's gradient_clipping (train's value)
)

PACKAGES = ("expo-bench", "torch", "lightning", "torchmetrics", "transformers", "pydantic")


def git_revision(where: Path) -> str:
    """HEAD's sha of the checkout holding ``where``, with ``-dirty`` for uncommitted changes outside results/."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results")
        return sha + ("-dirty" if changes else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def committed_files(folder: Path) -> list[str]:
    """The files git tracks under ``folder`` (none outside a git checkout, or where the folder does not exist yet)."""
    if not folder.is_dir():
        return []
    try:
        found = subprocess.run(["git", "ls-files", "--", "."], cwd=folder, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return found.stdout.splitlines()


def refuse_dirty_overwrite(out_dir: Path, revision: str, allow_dirty: bool) -> None:
    """Committed results must come from committed code: a UserError if ``out_dir`` holds files git tracks and the code
    has uncommitted changes (``revision`` ends in ``-dirty``), unless ``allow_dirty`` (then summary.json says so)."""
    if allow_dirty or not revision.endswith("-dirty"):
        return
    tracked = committed_files(out_dir)
    if tracked:
        files = f"{len(tracked)} tracked file{'s' if len(tracked) != 1 else ''}, e.g. {tracked[0]}"
        raise UserError(
            f"{out_dir} holds committed results ({files}) and the code has "
            f"uncommitted changes ({revision}): results written now could not be regenerated from any commit. Commit "
            "first, write elsewhere (--results DIR), or pass --allow-dirty (recorded in summary.json)"
        )


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def start_ranks(experiments: Sequence[Experiment], console: Console) -> None:
    """Start (or join) the processes the recipes train in, before any work; only rank zero prints."""
    world = common_world(experiments)
    start_world(world.accelerator, world.devices, world.num_nodes)
    console.quiet = console.quiet or not is_global_zero()


def preflight(experiment: Experiment, results_root: Path) -> None:
    """Check what a run will need from outside before anything trains: every LLM judge's endpoint and model."""
    experiment.recipe.task.check_judges(results_root / experiment.recipe.experiment / "cache" / "judgments")


def run_experiment(
    experiment: Experiment, results_root: Path, console: Console, allow_dirty: bool = False, share: SweepShare | None = None
) -> Path:
    """Train and evaluate every method of the recipe, recording each run in the tracking store; write
    results, the leaderboard among them, under ``results_root/<experiment>``. A ``share`` of the sweep (its shared work
    alone, or the runs a worker claims) writes no report: the sweep that runs it all afterwards reuses every run."""
    share = share or SweepShare()
    preflight(experiment, results_root)
    recipe = experiment.recipe
    out_dir = results_root / recipe.experiment
    revision = git_revision(Path(__file__).parent)  # the code as it was when the run started
    refuse_dirty_overwrite(out_dir, revision, allow_dirty)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    uri = tracking.resolve_tracking_uri(recipe.tracking.uri, results_root)
    versions = package_versions()
    tags = {tracking.GIT_SHA: revision, tracking.RECIPE_HASH: recipe.fingerprint(), **tracking.version_tags(versions)}
    resolved = recipe.model_dump(mode="json")
    tracker = tracking.SweepTracker(uri, recipe.experiment, recipe.fingerprint(), resolved, tags)
    with tracker if is_global_zero() else nullcontext(tracker) as sweep:  # rank zero records; see records.open_run
        with warnings.catch_warnings():
            for message in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            runs = tracking.RunLog(sweep, tags)
            family = sweep_for(SweepContext(experiment, console, out_dir / "cache", out_dir / "runs", runs, share))
            records = family.run()
        if not is_global_zero() or share.stage != "all":  # the reports are rank zero's, once every run is done
            return out_dir
        written = family.report(records, out_dir)
        summary_path = write_summary(experiment, records, out_dir, revision, started, started_at, versions, allow_dirty)
        recipe_path = out_dir / "resolved_recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(resolved, sort_keys=False))
        # this recipe's runs only: the store may hold other configurations of the experiment from earlier recipes
        ranked = load_leaderboard(uri, recipe.experiment, recipe.baseline_method, recipe.statistics, sweep.opened)
        written += write_leaderboard(ranked, out_dir, console)
        sweep.parent.log_artifacts([recipe_path, summary_path, *written])
    console.print(f"wrote {', '.join(str(path) for path in [summary_path, recipe_path, *written])}")
    console.print(f"tracked in {uri} (browse: expo-bench ui --results {results_root})")
    console.print(f"finished in {round(time.perf_counter() - started, 1)} s")
    return out_dir


def write_summary(
    experiment: Experiment,
    records: Sequence[RunRecord],
    out_dir: Path,
    revision: str,
    started: float,
    started_at: str,
    versions: dict[str, str],
    allow_dirty: bool = False,
) -> Path:
    recipe = experiment.recipe
    summary: dict[str, Any] = {
        "experiment": recipe.experiment,
        "recipe": str(experiment.source),
        "recipe_hash": recipe.fingerprint(),
        "git_sha": revision,
        "allow_dirty": allow_dirty,
        "started_at": started_at,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
        "packages": versions,
        "resolved_recipe": recipe.model_dump(mode="json"),
        "runs": [record.summary() for record in records],
    }
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary_path
