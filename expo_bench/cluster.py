"""``expo-bench submit RECIPE``: a sweep on a SLURM cluster through submitit, as three stages of jobs.

A first job prepares what every run shares (SFT, pairs, reference samples and log-probs, the reference's evaluation);
a job array then trains the runs, one run per array task (each claims the next unclaimed run: :mod:`expo_bench.sweep.
claims`), at most ``--workers`` at once, each task with the GPUs one run takes; a last job, once every task has
succeeded, runs the sweep whole (every run reused) and writes the summary and the leaderboard. Each job runs the same
``expo-bench run`` command with its stage, so a job does exactly what that command does on a laptop.

On SLURM the stages are chained by job dependencies (``afterok``) and the command returns once they are queued. With
``--cluster local`` (submitit's local executor: this machine, no scheduler) each stage is waited for before the next
is submitted. Jobs on several nodes must record into an MLflow tracking server (``expo-bench server``), never into a
shared SQLite file, whose locking network file systems do not honour.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from expo_bench.errors import UserError
from expo_bench.recipe import Experiment
from expo_bench.tracking import resolve_tracking_uri, sqlite_path

Cluster = Literal["slurm", "local"]


class StageFailed(RuntimeError):
    """A stage's ``expo-bench run`` exited non-zero (its job's log says why)."""


def stage(argv: list[str]) -> None:
    """What each job runs: ``expo-bench ARGV``, its output in the job's log; :class:`StageFailed` on a non-zero exit."""
    code = subprocess.run([sys.executable, "-m", "expo_bench", *argv], check=False).returncode
    if code:
        raise StageFailed(f"expo-bench {' '.join(argv)} exited {code}")


@dataclass(frozen=True)
class JobSettings:
    """The resources each job asks the scheduler for."""

    cluster: Cluster
    timeout_min: int
    cpus_per_task: int
    gpus_per_run: int
    partition: str | None = None
    mem_gb: int | None = None


def check_store(experiment: Experiment, results_root: Path, cluster: Cluster) -> str:
    """The tracking URI the jobs record into; :class:`UserError` for a SQLite file when jobs may run on several nodes."""
    uri = resolve_tracking_uri(experiment.recipe.tracking.uri, results_root)
    database = sqlite_path(uri)
    if cluster == "slurm" and (database is not None or uri.startswith("file:") or "://" not in uri):
        raise UserError(
            f"{experiment.source}: jobs on several nodes need an MLflow tracking server, not {database or uri} (file "
            "locks do not hold across nodes): start one on a node the jobs reach (expo-bench server --host 0.0.0.0) "
            "and pass --set tracking.uri=http://HOST:5000, or set MLFLOW_TRACKING_URI"
        )
    return uri


def submit(
    experiment: Experiment, run_argv: Sequence[str], results_root: Path, workers: int, settings: JobSettings, console: Console
) -> list[str]:
    """Submit the three stages of ``experiment``'s sweep (``run_argv``: its ``expo-bench run`` arguments); the job ids,
    prepare first and report last."""
    import submitit

    uri = check_store(experiment, results_root, settings.cluster)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    folder = (results_root / experiment.recipe.experiment / "workers" / f"{stamp}-{settings.cluster}").absolute()
    claims = folder / "claims"
    try:
        executor = submitit.AutoExecutor(folder=folder / "jobs", cluster=settings.cluster)
    except RuntimeError as error:  # submitit's "Could not detect srun": not on a SLURM cluster
        raise UserError(f"--cluster slurm: {error} Submit from the cluster's login node, or pass --cluster local") from None
    common: dict[str, Any] = {
        "name": f"expo-bench-{experiment.recipe.experiment}",
        "timeout_min": settings.timeout_min,
        "cpus_per_task": settings.cpus_per_task,
        "gpus_per_node": settings.gpus_per_run,
        "tasks_per_node": 1,
        "nodes": 1,
    }
    if settings.mem_gb is not None:
        common["mem_gb"] = settings.mem_gb
    if settings.cluster == "slurm" and settings.partition is not None:
        common["slurm_partition"] = settings.partition
    runs = experiment.run_count
    waits = settings.cluster != "slurm"  # without a scheduler there are no dependencies: wait for each stage

    def submitted(job: Any, what: str) -> str:
        console.print(f"{what}: job {job.job_id} (logs: {folder / 'jobs'})", soft_wrap=True)
        if waits:
            job.result()  # raises with the job's traceback when it failed
        return str(job.job_id)

    executor.update_parameters(**common)
    prepare = submitted(executor.submit(stage, [*run_argv, "--stage", "prepare"]), "prepare the shared work")
    executor.update_parameters(**common, **_after(settings.cluster, [prepare]))
    if settings.cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=workers)
    tasks = [
        [*run_argv, "--stage", "work", "--claims", str(claims), "--worker-name", f"task-{k}", "--max-runs", "1"]
        for k in range(runs)
    ]
    if waits:  # the local executor has no array parallelism: start the workers in waves of ``workers``
        jobs = []
        for start in range(0, runs, workers):
            wave = executor.map_array(stage, tasks[start : start + workers])
            jobs += [submitted(job, f"runs {start + 1}-{start + len(wave)} of {runs}") for job in wave]
        array = jobs
    else:
        array_jobs = executor.map_array(stage, tasks)
        array = [str(job.job_id) for job in array_jobs]
        console.print(f"{runs} runs: job array {array[0].split('_')[0]}, at most {workers} at once", soft_wrap=True)
    executor.update_parameters(**common, **_after(settings.cluster, array))
    report = submitted(executor.submit(stage, list(run_argv)), "the report, once every run succeeded")
    console.print(f"recording into {uri}", soft_wrap=True)
    return [prepare, *array, report]


def _after(cluster: Cluster, jobs: Sequence[str]) -> dict[str, str]:
    """The dependency that starts a job once ``jobs`` succeeded (an array by its id once)."""
    if cluster != "slurm":
        return {}
    return {"slurm_dependency": "afterok:" + ":".join(dict.fromkeys(job.split("_")[0] for job in jobs))}
