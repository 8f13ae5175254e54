"""``expo-bench run RECIPE --workers N``: one recipe's runs shared out among N worker processes on this machine.

Three stages, each the same ``expo-bench run`` command: this process prepares what every run shares (SFT, pairs,
reference samples and log-probs, the reference's evaluation: cached under locks, so computed once) while N workers
start and claim runs one at a time (:mod:`expo_bench.sweep.claims`), each with its share of the CPU threads or its own
GPUs; finally this process runs the sweep whole, which reuses every run, and writes the summary and the leaderboard.
A worker's output goes to its log file; a worker that fails leaves its run to be resumed by the next sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from expo_bench.errors import UserError
from expo_bench.recipe import Experiment
from expo_bench.reporting import progress
from expo_bench.runner import run_experiment
from expo_bench.sweep.claims import SweepShare, finished_runs
from expo_bench.train_config import Machine

POLL_S = 1.0
"""How often the pool looks at its workers and the runs they finished."""


@dataclass(frozen=True)
class WorkerSlice:
    """What one worker process may use: CPU threads, and GPUs where the runs train on them."""

    threads: int
    gpus: tuple[str, ...] = ()

    def environment(self) -> dict[str, str]:
        """The worker's environment: this process's with its threads (and GPUs) set."""
        slice_ = {name: str(self.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if self.gpus:
            slice_["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return {**os.environ, **slice_}


def worker_slices(workers: int, cores: int, gpus: Sequence[str] | None, devices_per_run: int) -> list[WorkerSlice]:
    """``workers`` slices of this machine: the cores split evenly (at least one thread each) and, when runs train on
    GPUs, ``devices_per_run`` GPUs each; :class:`UserError` when there are not enough GPUs for every worker."""
    threads = max(1, cores // workers)
    if gpus is None:
        return [WorkerSlice(threads) for _ in range(workers)]
    if workers * devices_per_run > len(gpus):
        raise UserError(
            f"--workers {workers}: each run trains on {devices_per_run} GPU(s) and this machine has {len(gpus)}; "
            f"pass --workers {max(1, len(gpus) // devices_per_run)} or fewer"
        )
    return [WorkerSlice(threads, tuple(gpus[i * devices_per_run : (i + 1) * devices_per_run])) for i in range(workers)]


def require_shareable(experiment: Experiment, what: str) -> None:
    """:class:`UserError` naming ``what`` (``--workers 2``, ``expo-bench submit``) for a recipe whose runs are not shared
    out among processes."""
    if not experiment.recipe.task.trains_with_lightning:
        raise UserError(
            f"{experiment.source}: {what}: a tabular task trains every λ as replicas of one policy in one process, in "
            "seconds; runs are shared out for language-model recipes"
        )


def slices_for(experiment: Experiment, workers: int, machine: Machine) -> list[WorkerSlice]:
    """This machine shared among ``workers`` for ``experiment``'s runs; :class:`UserError` for a recipe whose runs cannot
    be shared out here (tabular, several nodes, several CPU processes per run)."""
    source = experiment.source
    require_shareable(experiment, f"--workers {workers}")
    world = experiment.world
    if world.num_nodes != 1:
        raise UserError(f"{source}: --workers shares out runs on this machine; for train.num_nodes > 1 use expo-bench submit")
    on_gpus = world.accelerator in ("gpu", "cuda") or (world.accelerator == "auto" and machine.gpus > 0)
    if not on_gpus:  # Lightning's "auto" on a CPU is one process
        if world.devices not in (1, "auto"):
            raise UserError(f"{source}: train.devices is {world.devices!r}: with --workers each run is one CPU process")
        return worker_slices(workers, machine.cpus, None, 1)
    if not isinstance(world.devices, int):
        raise UserError(f"{source}: train.devices is {world.devices!r}: with --workers set the GPUs each run takes")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(index) for index in range(machine.gpus)]
    return worker_slices(workers, machine.cpus, gpus, world.devices)


def run_with_workers(
    experiment: Experiment,
    run_argv: Sequence[str],
    results_root: Path,
    console: Console,
    slices: Sequence[WorkerSlice],
    allow_dirty: bool = False,
) -> Path:
    """Prepare, start one worker per slice (``expo-bench RUN_ARGV``: :func:`run_arguments`), then report;
    :class:`UserError` naming each failed worker and its log after the others have finished."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    folder = results_root / experiment.recipe.experiment / "workers" / f"{stamp}-{os.getpid()}"
    claims = folder / "claims"
    console.print(f"{len(slices)} workers (their logs: {folder}) start while this process prepares what every run shares")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for index, worker in enumerate(slices):
            log = folder / f"worker-{index + 1}.log"
            name = f"worker-{index + 1}"
            command = [sys.executable, "-m", "expo_bench", *run_argv, "--stage", "work", "--claims", str(claims)]
            command += ["--worker-name", name]
            with log.open("wb") as output:
                process = subprocess.Popen(command, env=worker.environment(), stdout=output, stderr=subprocess.STDOUT)
            workers.append((process, log))
        # a worker that needs a seed's shared work before this process has cached it waits on the entry's lock (or
        # computes it while this process waits): each entry is computed once either way
        run_experiment(experiment, results_root, console, allow_dirty, SweepShare("prepare"))
        _wait(workers, claims, experiment.run_count, console)
    finally:
        for process, _ in workers:  # on Ctrl-C or an error here: each worker checkpoints and stops (SIGTERM)
            if process.poll() is None:
                process.terminate()
        for process, _ in workers:
            process.wait()
    failed = [(process.returncode, log) for process, log in workers if process.returncode != 0]
    if failed:
        raise UserError(
            f"{len(failed)} of {len(workers)} workers failed ("
            + "; ".join(f"exit {code}, see {log}" for code, log in failed)
            + f"); the {finished_runs(claims)} runs they finished are kept: the same command resumes the rest"
        )
    console.print(f"{len(slices)} workers trained {finished_runs(claims)} runs in {time.perf_counter() - started:.1f} s")
    return run_experiment(experiment, results_root, console, allow_dirty)


def _wait(workers: Sequence[tuple[subprocess.Popen[bytes], Path]], claims: Path, total: int, console: Console) -> None:
    """Until every worker exits, show how many runs they have finished (a bar on a terminal, else a line per change)."""
    shown = -1
    with progress(console, f"runs finished by {len(workers)} workers", total) as done:
        while any(process.poll() is None for process, _ in workers):
            finished = finished_runs(claims)
            if finished != shown:
                if done is not None:
                    done(finished)
                else:
                    console.print(f"{finished} of {total} runs finished")
                shown = finished
            time.sleep(POLL_S)


def run_arguments(recipe: Path, overrides: Sequence[str], only: Sequence[str], results: Path, allow_dirty: bool) -> list[str]:
    """The arguments of the ``expo-bench run`` each stage runs: this recipe alone, with the user's ``--set`` and
    ``--only``."""
    arguments = ["run", str(recipe), "--results", str(results), "--yes"]
    for override in overrides:
        arguments += ["--set", override]
    for selection in only:
        arguments += ["--only", selection]
    return arguments + (["--allow-dirty"] if allow_dirty else [])
