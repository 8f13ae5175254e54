"""``expo-bench run --workers N``: runs shared out among worker processes give the numbers one process gives, the shared
work is computed once, each run is claimed by one worker, and a killed worker's run is resumed by the next sweep."""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from expo_bench.errors import UserError
from expo_bench.pool import WorkerSlice, slices_for, worker_slices
from expo_bench.recipe import validate_recipe
from expo_bench.sweep.claims import Claims, finished_runs
from expo_bench.train_config import Machine

ROOT = Path(__file__).parent.parent
EXPO_BENCH = str(Path(sys.executable).parent / "expo-bench")
RECIPE = ROOT / "recipes" / "synthetic_tokens_tuned.yaml"
EXPERIMENT = "synthetic_tokens_tuned"
SLICE = ["--only", "seed=0", "--only", "method=ipo", "--set", "train.max_epochs=1"]
"""Eight runs of the tuned comparison: ipo's grid of four τ by two learning rates (two entries of one label)."""
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
"""float32 sums depend on the threads that compute them: both sweeps compute every run with one thread."""


def sweep(results: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [EXPO_BENCH, "run", str(RECIPE), "--results", str(results), *SLICE, *extra]
    return subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=600)


def numbers(results: Path, *settings: str) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The leaderboard without its run ids (and the columns naming the recipe's ``settings``), and every run's
    evaluation and training history."""
    with (results / EXPERIMENT / "leaderboard.csv").open() as table:
        left_out = {"run_ids", *settings}
        rows = [{key: value for key, value in row.items() if key not in left_out} for row in csv.DictReader(table)]
    summary = json.loads((results / EXPERIMENT / "summary.json").read_text())
    runs = [{key: run.get(key) for key in ("method", "lam", "eval", "loss_history", "steps")} for run in summary["runs"]]
    return rows, runs


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("serial")
    done = sweep(results)
    assert done.returncode == 0, done.stderr[-3000:]
    return results


def worker_logs(results: Path) -> list[str]:
    return [log.read_text() for log in sorted((results / EXPERIMENT / "workers").glob("*/worker-*.log"))]


def test_two_workers_give_the_numbers_one_process_gives_and_share_the_work_once(serial: Path, tmp_path: Path) -> None:
    done = sweep(tmp_path, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert numbers(tmp_path) == numbers(serial)
    assert "2 workers trained 8 runs" in done.stdout
    logs = worker_logs(tmp_path)
    assert len(logs) == 2
    # the shared work computed once, by the parent or by the first worker that needed it; the others read the cache
    everything = [done.stdout, *logs]
    assert sum(text.count("reference log-probs of 1088 pairs: computed once") for text in everything) == 1
    sft_lines = [line for text in everything for line in text.splitlines() if "SFT: held-out NLL per token" in line]
    assert len([line for line in sft_lines if "from the cache" not in line]) == 1
    # every run trained by exactly one worker, and the final pass reused all of them
    trained = [line for log in logs for line in log.splitlines() if "steps in" in line and "SFT" not in line]
    assert len(trained) == 8 and len({line for line in trained}) == 8
    assert done.stdout.count("finished in an earlier run, reusing") == 8


@pytest.mark.slow  # two pools of three processes each: about a minute
def test_a_killed_worker_fails_the_sweep_and_the_same_command_resumes_its_run(serial: Path, tmp_path: Path) -> None:
    """Both workers are killed (SIGKILL: no cleanup) once a run has checkpointed; the pool exits non-zero naming them,
    and the same command resumes the checkpointed run and ends with the serial sweep's numbers."""
    command = [EXPO_BENCH, "run", str(RECIPE), "--results", str(tmp_path), *SLICE]
    command += ["--workers", "2", "--set", "train.checkpoint_every_n_steps=4"]
    pool = subprocess.Popen(command, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / EXPERIMENT / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/last.ckpt")) and time.monotonic() < deadline and pool.poll() is None:
        time.sleep(0.05)
    claims = next((tmp_path / EXPERIMENT / "workers").glob("*/claims"))
    for claim in claims.glob("*"):
        if not claim.name.endswith(".done"):
            pid = int(claim.read_text().split(" pid ")[1].split()[0])
            with contextlib.suppress(ProcessLookupError):  # that worker had already finished
                os.kill(pid, signal.SIGKILL)
    out, err = pool.communicate(timeout=300)
    assert pool.returncode == 2, out[-2000:] + err[-2000:]
    assert "workers failed (exit -9, see" in err and "the same command resumes the rest" in " ".join(err.split())
    assert not (tmp_path / EXPERIMENT / "leaderboard.csv").exists()
    again = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert any("resuming from" in log for log in worker_logs(tmp_path))
    checkpointing = ("recipe_hash", "config_key", "params")  # the recipe differs by checkpoint_every_n_steps
    assert numbers(tmp_path, *checkpointing) == numbers(serial, *checkpointing)


def _claim_all(folder: str, worker: str, slots: list[str], out: Any) -> None:
    claims = Claims(Path(folder), worker)
    out.put((worker, [slot for slot in slots if claims.take(slot)]))


def test_every_slot_is_claimed_by_exactly_one_of_four_racing_processes(tmp_path: Path) -> None:
    slots = [f"s{seed}/dpo/{index}" for seed in range(5) for index in range(20)]
    context = multiprocessing.get_context("fork")  # four processes racing, without importing the suite again
    queue: Any = context.Queue()
    processes = [context.Process(target=_claim_all, args=(str(tmp_path), f"w{k}", slots, queue)) for k in range(4)]
    for process in processes:
        process.start()
    taken = dict(queue.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    claimed = [slot for mine in taken.values() for slot in mine]
    assert sorted(claimed) == sorted(slots)
    Claims(tmp_path, "w0").finish(slots[0])
    assert finished_runs(tmp_path) == 1 and not Claims(tmp_path, "w9").take(slots[0])


def test_the_machine_is_split_among_the_workers() -> None:
    assert worker_slices(2, 2, None, 1) == [WorkerSlice(1), WorkerSlice(1)]
    assert worker_slices(3, 16, None, 1) == [WorkerSlice(5)] * 3
    assert worker_slices(4, 2, None, 1) == [WorkerSlice(1)] * 4  # never zero threads
    gpus = ["0", "1", "2", "3"]
    assert [w.gpus for w in worker_slices(2, 16, gpus, 2)] == [("0", "1"), ("2", "3")]
    assert [w.gpus for w in worker_slices(4, 16, gpus, 1)] == [("0",), ("1",), ("2",), ("3",)]
    assert WorkerSlice(8, ("2", "3")).environment()["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert WorkerSlice(3).environment()["OMP_NUM_THREADS"] == "3"
    with pytest.raises(UserError, match="each run trains on 2 GPU"):
        worker_slices(3, 16, gpus, 2)


def recipe(path: str, **train: Any) -> Any:
    import yaml

    loaded = yaml.safe_load((ROOT / "recipes" / path).read_text())
    loaded["train"] = {**loaded["train"], **train}
    if "accelerator" in train:  # every stage trains in one world
        loaded["task"]["sft"]["accelerator"] = train["accelerator"]
    return validate_recipe(loaded, ROOT / "recipes" / path)


CPU = Machine(gpus=0, bf16=False, cpus=2, packages=frozenset())


def test_recipes_whose_runs_cannot_be_shared_out_are_refused_by_name() -> None:
    assert len(slices_for(recipe("quickstart.yaml"), 2, CPU)) == 2
    with pytest.raises(UserError, match="tabular task trains every λ as replicas"):
        slices_for(recipe("synthetic_interpolation.yaml"), 2, CPU)
    with pytest.raises(UserError, match=r"train\.devices is 2: with --workers each run is one CPU process"):
        slices_for(recipe("quickstart.yaml", devices=2), 2, CPU)
    eight = Machine(gpus=8, bf16=True, cpus=64, packages=frozenset())
    with pytest.raises(UserError, match="set the GPUs each run takes"):
        slices_for(recipe("quickstart.yaml", accelerator="gpu", devices="auto"), 2, eight)
    shares = slices_for(recipe("quickstart.yaml", accelerator="gpu", devices=2), 4, eight)
    assert [share.gpus for share in shares][-1] == ("6", "7") and shares[0].threads == 16


def test_stage_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from expo_bench.cli import main

    base = ["run", str(ROOT / "recipes" / "quickstart.yaml"), "--results", str(tmp_path)]
    assert main([*base, "--stage", "work"]) == 2
    assert "--stage work needs --claims" in capsys.readouterr().err
    assert main([*base, "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    assert main([*base, "--workers", "2", "--stage", "prepare"]) == 2
    assert "--workers starts the stages itself" in capsys.readouterr().err
