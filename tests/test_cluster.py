"""``expo-bench submit``: a sweep as jobs through submitit (prepare, one array task per run, the report), recording into
a live MLflow tracking server started by ``expo-bench server``; the SLURM stages' dependencies, checked on the sbatch
scripts submitit writes; SQLite refused for jobs on several nodes."""

from __future__ import annotations

import csv
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXPO_BENCH = str(Path(sys.executable).parent / "expo-bench")
SLICE = ["--only", "seed=0", "--only", "method=ipo", "--set", "train.max_epochs=1"]
"""Three runs of the quickstart: ipo at three λ."""
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``expo-bench server`` on 127.0.0.1, as a user starts it; its URL and results root."""
    results, port = tmp_path_factory.mktemp("server"), free_port()
    process = subprocess.Popen(
        [EXPO_BENCH, "server", "--results", str(results), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ONE_THREAD,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"expo-bench server did not start: {process.communicate()[0][-2000:]}")
            time.sleep(0.5)
    yield url, results
    process.terminate()
    output = process.communicate(timeout=60)[0]
    assert f"record sweeps here: --set tracking.uri={url}" in output


def leaderboard(results: Path) -> list[dict[str, str]]:
    with (results / "quickstart" / "leaderboard.csv").open() as table:
        left_out = {"run_ids", "recipe_hash", "config_key", "params"}  # the recipes differ by tracking.uri
        return [{key: value for key, value in row.items() if key not in left_out} for row in csv.DictReader(table)]


@pytest.mark.slow  # a server and six job processes: about 100 s
def test_a_sweep_through_submitits_local_executor_records_into_the_server(
    tracking_server: tuple[str, Path], tmp_path: Path
) -> None:
    url, server_results = tracking_server
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    serial = subprocess.run(
        [EXPO_BENCH, "run", recipe, "--results", str(tmp_path / "serial"), *SLICE],
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert serial.returncode == 0, serial.stderr[-3000:]
    command = [EXPO_BENCH, "submit", recipe, "--cluster", "local", "--workers", "2", "--results", str(tmp_path / "jobs")]
    done = subprocess.run(
        [*command, *SLICE, "--set", f"tracking.uri={url}"], env=ONE_THREAD, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    flat = " ".join(done.stdout.split())
    assert "prepare the shared work: job" in flat and "runs 1-2 of 3" in flat and "runs 3-3 of 3" in flat
    assert "every job finished" in flat
    assert leaderboard(tmp_path / "jobs") == leaderboard(tmp_path / "serial")
    assert not (tmp_path / "jobs" / "mlflow.db").exists()  # every job recorded through the server

    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    runs = [run for run in client.search_runs([experiment.experiment_id]) if "expo_bench.run_key" in run.data.tags]
    assert len(runs) == 4 and all(run.data.tags.get("expo_bench.complete") == "true" for run in runs)
    assert (server_results / "mlflow.db").is_file()
    assert any((server_results / "mlartifacts").rglob("metrics.json"))  # artifacts went through the server too


FAKE_SBATCH = """#!{python}
import pathlib, sys
log = pathlib.Path({log!r})
count = len(list(log.glob("*.sh")))
script = pathlib.Path(sys.argv[-1]).read_text()
(log / f"{{count}}.sh").write_text(script)
print(f"Submitted batch job {{1001 + count}}")
"""


def test_slurm_stages_wait_for_each_other_through_job_dependencies(tmp_path: Path) -> None:
    """The sbatch scripts submitit writes, captured by a stand-in ``sbatch``: prepare, an array of one task per run at
    most --workers at once after prepare succeeded, the report after every task succeeded."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    log.mkdir()
    sbatch, srun = bin_dir / "sbatch", bin_dir / "srun"  # submitit looks for srun to tell it is on a SLURM cluster
    sbatch.write_text(FAKE_SBATCH.format(python=sys.executable, log=str(log)))
    srun.write_text("#!/bin/sh\nexit 1\n")
    for script in (sbatch, srun):
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    environment = {**ONE_THREAD, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [EXPO_BENCH, "submit", str(ROOT / "recipes" / "quickstart.yaml"), "--results", str(tmp_path), *SLICE]
    command += ["--workers", "2", "--partition", "gpu", "--set", "tracking.uri=http://tracking.example:5000"]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prepare, array, report = [(log / f"{index}.sh").read_text() for index in range(3)]
    assert "#SBATCH --partition=gpu" in prepare and "dependency" not in prepare
    assert "#SBATCH --array=0-2%2" in array and "#SBATCH --dependency=afterok:1001" in array
    assert "#SBATCH --dependency=afterok:1002" in report and "--array" not in report
    assert "queued 5 jobs" in " ".join(done.stdout.split())


def test_submitting_to_slurm_where_there_is_none_says_so(tmp_path: Path) -> None:
    command = [EXPO_BENCH, "submit", str(ROOT / "recipes" / "quickstart.yaml"), "--results", str(tmp_path), *SLICE]
    command += ["--set", "tracking.uri=http://tracking.example:5000"]
    no_slurm = {**ONE_THREAD, "PATH": str(Path(sys.executable).parent)}  # even on a cluster: no srun, no sbatch
    refused = subprocess.run(command, env=no_slurm, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "Submit from the cluster's login node, or pass --cluster local" in " ".join(refused.stderr.split())


def test_jobs_on_several_nodes_are_refused_a_sqlite_store(tmp_path: Path) -> None:
    command = [EXPO_BENCH, "submit", str(ROOT / "recipes" / "quickstart.yaml"), "--results", str(tmp_path), *SLICE]
    refused = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "jobs on several nodes need an MLflow tracking server" in message and "expo-bench server" in message
    assert not list(tmp_path.rglob("*.sh"))  # nothing was submitted
