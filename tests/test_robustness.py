"""Nothing lost, nothing wrong, nothing let in: a run resumes exactly from any checkpoint, a finished run is evaluated
from its final weights, a diverging run fails by name and is never ranked, nothing unsafe is loaded from disk, and two
sweeps on one store never train a run twice."""

from __future__ import annotations

import csv
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.exceptions import MlflowException
from rich.console import Console
from safetensors import SafetensorError

from expo_bench import metric_keys, runner, tracking
from expo_bench.cli import main
from expo_bench.errors import UserError
from expo_bench.recipe import validate_recipe
from expo_bench.runner import run_experiment
from expo_bench.sweep import fit
from expo_bench.train_config import TrainConfig
from expo_bench.trainer import build_trainer

ROOT = Path(__file__).parent.parent


class Interrupted(Exception):
    """Stands for a machine lost right after a checkpoint was written."""


def quickstart(**train: Any) -> dict[str, Any]:
    """A slice of the quickstart: 2 prompts, no SFT, DPO, evaluated by the exact oracle; a tiny model with dropout (so
    the random stream matters), AdamW with warmup (so the optimizer and scheduler state matter)."""
    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data["seeds"] = [0]
    data["task"] |= {"prompts": 2, "train_pairs_per_prompt": 6, "sft": None}
    data["task"]["model"] = {
        "tiny": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 16, "hidden_dropout": 0.1, "attention_dropout": 0.1}
    }  # fmt: skip
    data["task"]["evaluation"] |= {"samples_per_prompt": 4, "selection": None}
    data["train"] |= {"max_epochs": 2, "batch_size": 4, "log_every_n_steps": 1, **train}
    data["train"]["optimizer"] |= {"warmup_steps": 2}
    data["methods"] = [{"method": "dpo", "params": {"beta": 0.1}}]
    return data


def dpo_run(data: dict[str, Any], root: Path, console: Console | None = None) -> dict[str, Any]:
    out = run_experiment(validate_recipe(data, "quickstart.yaml"), root, console or Console(quiet=True))
    return dict(json.loads((out / "summary.json").read_text())["runs"][1])


def run_dir(root: Path) -> Path:
    [found] = (root / "quickstart" / "runs").glob("dpo-*")
    return found


def test_a_run_killed_after_any_checkpoint_ends_exactly_where_an_uninterrupted_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = quickstart(checkpoint_every_n_steps=1)
    whole = dpo_run(data, tmp_path / "whole")
    steps = whole["steps"]
    assert steps == 6  # 3 batches an epoch, 2 epochs: checkpoints mid-epoch, at the epoch's end and at the last step
    save, kill_after = ModelCheckpoint._save_checkpoint, [0]

    def save_then_die(self: ModelCheckpoint, trainer: L.Trainer, filepath: str) -> None:
        save(self, trainer, filepath)
        if trainer.global_step == kill_after[0]:
            raise Interrupted

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", save_then_die)
    for step in range(1, steps + 1):  # each rerun resumes from the checkpoint the run before it died after
        kill_after[0] = step
        with pytest.raises(Interrupted):
            dpo_run(data, tmp_path / "killed")
        assert not (run_dir(tmp_path / "killed") / "record.json").exists()
    log = Console(record=True, width=200)
    resumed = dpo_run(data, tmp_path / "killed", log)
    assert "resuming from" in log.export_text()
    for key in ("steps", "eval_after", "loss_history", "eval"):
        assert resumed[key] == whole[key], key  # exactly: the data order, step, optimizer, scheduler and random state
    assert resumed["eval"][metric_keys.KL_TO_TARGET.key] > 0


def test_run_directories_and_tracking_keys_are_those_earlier_versions_wrote(tmp_path: Path) -> None:
    """Refactors keep every name a finished store is found by (these are what commit 01590f4 wrote), so a store from
    before is reused, not retrained."""
    dpo_run(quickstart(max_epochs=1), tmp_path)
    runs = tmp_path / "quickstart" / "runs"
    assert sorted(path.name for path in runs.iterdir() if path.is_dir()) == ["dpo-ac72aa6dcb1b", "sft-reference-0ff00c11b767"]
    assert {path.name for path in runs.glob("*/evaluation-*")} == {"evaluation-939e02d6b5b8"}
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    tracked = {
        run.data.tags[tracking.RUN_KEY]: (run.info.run_name, run.data.tags[tracking.CONFIG_KEY], len(run.data.params))
        for run in client.search_runs([experiment.experiment_id])
        if tracking.RUN_KEY in run.data.tags
    }
    assert tracked == {  # the leaderboard groups seeds by config key
        "dpo-ac72aa6dcb1b/939e02d6b5b8": ("dpo λ=0.1 s0", "fdde16428c6d", 52),
        "sft-reference-0ff00c11b767/939e02d6b5b8": ("sft-reference s0", "5efbf9cb5404", 19),
    }


def test_a_finished_run_keeps_its_final_weights_and_is_evaluated_from_them(tmp_path: Path) -> None:
    data = quickstart(max_epochs=1, checkpoint_every_n_steps=2)  # 3 steps: the last periodic checkpoint is step 2
    first = dpo_run(data, tmp_path)
    directory = run_dir(tmp_path)
    record = json.loads((directory / "record.json").read_text())
    assert (record["steps"], record["weights"], record["weights_step"]) == (3, "weights.safetensors", 3)
    files = sorted(path.name for path in directory.iterdir() if not path.is_dir())
    assert files == ["record.json", "record.json.sha256", "weights.safetensors"]

    [evaluation] = directory.glob("evaluation-*")  # a lost evaluation is redone from the final weights
    shutil.rmtree(evaluation)
    data["task"]["evaluation"]["evaluate_only"] = True
    assert dpo_run(data, tmp_path)["eval"] == first["eval"]

    for evaluation in directory.glob("evaluation-*"):  # a run recorded before weights were kept, whose last
        shutil.rmtree(evaluation)  # checkpoint is stale, is refused
    (directory / "weights.safetensors").unlink()
    torch.save({"global_step": 2, "state_dict": {}}, directory / "last.ckpt")
    with pytest.raises(UserError, match=r"holds step 2 but dpo λ=0.1 finished at step 3"):
        dpo_run(data, tmp_path)


@pytest.mark.parametrize(
    ("keep", "kept"),
    [
        ("full", ["last.ckpt", "record.json", "record.json.sha256", "weights.safetensors"]),
        ("none", ["record.json", "record.json.sha256"]),
    ],
)
def test_what_a_finished_run_keeps_is_a_choice(tmp_path: Path, keep: str, kept: list[str]) -> None:
    data = quickstart(max_epochs=1, checkpoint_every_n_steps=2, keep=keep)
    dpo_run(data, tmp_path)
    directory = run_dir(tmp_path)
    assert sorted(path.name for path in directory.iterdir() if not path.is_dir()) == kept
    if keep == "full":  # the final state, not the step-2 save
        assert torch.load(directory / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    "method", [{"method": "ipo", "params": {"tau": 1e-20}}, {"method": "ipo", "train": {"optimizer": {"lr": 1e4}}}]
)
def test_a_diverging_run_stops_by_name_and_is_never_reused_or_ranked(tmp_path: Path, method: dict[str, Any]) -> None:
    data = quickstart(max_epochs=1)
    data["methods"] = [method, {"method": "dpo", "params": {"beta": 0.1}}]
    log = Console(record=True, width=300)
    out = run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, log)
    text = log.export_text()
    assert re.search(r"ipo λ=\S+: failed: ipo: non-finite", text) and "optimizer step" in text
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [run["method"] for run in runs] == ["sft-reference", "dpo"]  # the others go on
    assert not list((out / "runs").glob("ipo-*/record.json")) and not list((out / "runs").glob("ipo-*/weights.*"))
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [failed] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id], "tags.`expo_bench.method` = 'ipo'")
    assert failed.info.status == "FAILED" and tracking.COMPLETE not in failed.data.tags
    assert "non-finite" in failed.data.tags[tracking.FAILURE]
    assert "ipo" not in (out / "leaderboard.md").read_text()


def test_a_planted_pickle_in_a_run_folder_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    data = quickstart(max_epochs=1)
    first = dpo_run(data, tmp_path)
    directory = run_dir(tmp_path)
    [evaluation] = directory.glob("evaluation-*")
    shutil.rmtree(evaluation)
    (directory / "weights.safetensors").unlink()
    torch.save({"global_step": 3, "state_dict": Payload()}, directory / "last.ckpt")  # a finished run's old checkpoint
    data["task"]["evaluation"]["evaluate_only"] = True
    with pytest.raises(UserError, match=r"refusing to load .*last\.ckpt"):
        dpo_run(data, tmp_path)
    assert not marker.exists()

    (directory / "record.json").unlink()  # an unfinished run's checkpoint: Lightning's resume path
    data["task"]["evaluation"]["evaluate_only"] = False
    with pytest.raises(UserError, match=r"refusing to load .*last\.ckpt"):
        dpo_run(data, tmp_path)
    assert not marker.exists()

    cache = next((tmp_path / "quickstart" / "cache").glob("reference-logps-*.pt"))
    torch.save({"pairs": Payload()}, cache)  # a shared cache entry
    with pytest.raises(UserError, match=r"refusing to load .*reference-logps"):
        dpo_run(data, tmp_path)
    assert not marker.exists() and first["eval"]


def _sweep(root: str, delay: float) -> None:
    time.sleep(delay)
    dpo_run(quickstart(max_epochs=1), Path(root))


def test_two_sweeps_on_one_store_train_each_run_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    sweeps = [context.Process(target=_sweep, args=(str(tmp_path), delay)) for delay in (0.0, 0.5)]
    for sweep in sweeps:
        sweep.start()
    for sweep in sweeps:
        sweep.join(timeout=600)
    assert [sweep.exitcode for sweep in sweeps] == [0, 0]
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id], "tags.`expo_bench.method` = 'dpo'")
    steps = [point.step for point in client.get_metric_history(run.info.run_id, metric_keys.TRAIN_LOSS)]
    assert sorted(steps) == [0, 1, 2], "trained once: one loss per step"
    assert run.data.tags[tracking.COMPLETE] == "true"


@pytest.mark.slow  # a minute: two runs of the console script
def test_a_preempted_run_exits_143_saying_so_and_the_same_command_resumes_it(tmp_path: Path) -> None:
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(quickstart(max_epochs=40, checkpoint_every_n_steps=1)))  # 120 steps
    command = [str(Path(sys.executable).parent / "expo-bench"), "run", str(recipe), "--results", str(tmp_path)]
    environment = {**os.environ, "COLUMNS": "200"}
    preempted = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "quickstart" / "runs").glob("dpo-*/last.ckpt")):  # training has started
        assert preempted.poll() is None and time.monotonic() < deadline, preempted.communicate()
        time.sleep(0.05)
    preempted.send_signal(signal.SIGTERM)  # as SLURM or Kubernetes preempt
    _, err = preempted.communicate(timeout=300)
    assert preempted.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == [
        "interrupted: SIGTERM stopped the run; rerun the same command to resume it (finished work and the last "
        "checkpoint are kept)"
    ]
    assert not (run_dir(tmp_path) / "record.json").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert json.loads((run_dir(tmp_path) / "record.json").read_text())["steps"] == 120


@pytest.mark.parametrize(("signum", "line"), [(signal.SIGINT, "SIGINT stopped the run"), (signal.SIGTERM, "SIGTERM stopped")])
def test_a_stop_while_reporting_is_one_line_and_the_signal_s_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: int, line: str
) -> None:
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(quickstart(max_epochs=1)))
    # Ctrl-C as at a terminal, even where the suite itself was started in the background (which ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(runner, "write_summary", lambda *args: os.kill(os.getpid(), signum))
        assert main(["run", str(recipe), "--results", str(tmp_path)]) == 128 + signum
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert f"interrupted: {line}" in " ".join(err.split()) and "Traceback" not in err, err
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [sweep] = client.search_runs(
        [client.get_experiment_by_name("quickstart").experiment_id], f"tags.`{tracking.SWEEP_KEY}` != ''"
    )
    assert sweep.info.status == "KILLED"


def test_on_slurm_lightning_neither_requeues_nor_resumes_from_its_own_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "expo", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    environment = build_trainer(TrainConfig(accelerator="cpu"), [])._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue


def record_json(directory: Path) -> Path:
    return directory / "record.json"


def metrics_json(directory: Path) -> Path:
    return next(directory.glob("evaluation-*/metrics.json"))


@pytest.mark.parametrize(
    ("stored", "edit", "problem"),
    [
        (record_json, lambda text: text[: len(text) // 2], " column "),  # where the JSON breaks
        (record_json, lambda text: text.replace('"eval_after": {', '"eval_after": {"val/edited": "low",', 1), "got 'low'"),
        (metrics_json, lambda text: text.replace("{", '{"kl": [1],', 1), "expected a number, got '[1]'"),
    ],
)
def test_a_damaged_record_exits_2_naming_the_file_and_what_is_wrong(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stored: Callable[[Path], Path],
    edit: Callable[[str], str],
    problem: str,
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(quickstart(max_epochs=1)))
    assert main(["run", str(recipe), "--results", str(tmp_path)]) == 0
    damaged = stored(run_dir(tmp_path))
    damaged.write_text(edit(damaged.read_text()))
    damaged.with_name(damaged.name + ".sha256").unlink()  # as a run written before seals were kept: read, then refused
    capsys.readouterr()
    assert main(["run", str(recipe), "--results", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{damaged}: damaged or edited (" in err and problem in err and "Traceback" not in err, err


def test_an_edited_result_or_swapped_weights_are_refused_not_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run's record and metrics are sealed with their sha256 and its weights' sha256 is in its record: a
    metric edited to look better, or weights swapped between two λ runs, stop the rerun by name (exit 2)."""
    monkeypatch.setenv("COLUMNS", "400")
    data = quickstart(max_epochs=1)
    data["methods"] = [{"method": "dpo", "grid": {"beta": [0.1, 1.0]}}]
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe), "--results", str(tmp_path)]) == 0
    first, second = sorted((tmp_path / "quickstart" / "runs").glob("dpo-*"))
    metrics = metrics_json(first)
    values = json.loads(metrics.read_text())
    metrics.write_text(json.dumps(values | {"kl": 0.001}, indent=2))
    capsys.readouterr()
    assert main(["run", str(recipe), "--results", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{metrics}: edited or damaged since it was written" in err and "Traceback" not in err, err

    metrics.write_text(json.dumps(values, indent=2))  # restored: the seal holds again
    for evaluation in [*first.glob("evaluation-*"), *second.glob("evaluation-*")]:  # evaluated again from the weights
        shutil.rmtree(evaluation)
    weights = [directory / "weights.safetensors" for directory in (first, second)]
    swapped = [path.read_bytes() for path in reversed(weights)]
    for path, content in zip(weights, swapped, strict=True):
        path.write_bytes(content)
    capsys.readouterr()
    assert main(["run", str(recipe), "--results", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "not the weights dpo λ=" in err and "swapped or edited?" in err and "Traceback" not in err, err


def test_the_leaderboard_of_a_run_ranks_its_recipe_s_configurations_only(tmp_path: Path) -> None:
    """The store keeps the runs of an earlier version of the recipe (β 1): the new recipe's leaderboard (β 0.1) does
    not rank them, though they are complete runs of the same experiment."""
    data = quickstart(max_epochs=1)
    data["methods"] = [{"method": "dpo", "params": {"beta": 1.0}}]
    run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, Console(quiet=True))
    data["methods"] = [{"method": "dpo", "params": {"beta": 0.1}}]
    out = run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, Console(quiet=True))
    with (out / "leaderboard.csv").open() as table:
        rows = [row for row in csv.DictReader(table) if row["method"] == "dpo"]
    assert [json.loads(row["params"])["params.beta"] for row in rows] == ["0.1"], rows


def test_a_full_disk_mid_run_is_one_message_and_the_rerun_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while checkpointing, then while saving the final weights (safetensors says so in a
    ``SafetensorError``), then while MLflow records a metric (SQLite's words); each time one line and exit 2, and the
    run finally ends exactly where an uninterrupted one does."""
    data = quickstart(checkpoint_every_n_steps=1)
    whole = dpo_run(data, tmp_path / "whole")
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(data))
    save = ModelCheckpoint._save_checkpoint

    def checkpoint_at_step_4(self: ModelCheckpoint, trainer: L.Trainer, filepath: str) -> None:
        if trainer.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", filepath)
        save(self, trainer, filepath)

    def weights(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    def metric(*args: Any, **kwargs: Any) -> None:
        raise MlflowException("(sqlite3.OperationalError) database or disk is full")

    failures = [
        (ModelCheckpoint, "_save_checkpoint", checkpoint_at_step_4, "last.ckpt: No space left on device; free some space"),
        (fit, "save_model", weights, "No space left on device (SafetensorError); free some space"),
        (tracking.TrackedRun, "log_metrics", metric, "database or disk is full (MlflowException); free some space"),
    ]  # fmt: skip
    for owner, name, failing, message in failures:
        with monkeypatch.context() as full:
            full.setattr(owner, name, failing)
            full.setenv("COLUMNS", "400")
            assert main(["run", str(recipe), "--results", str(tmp_path / "full")]) == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err, err
    resumed = dpo_run(data, tmp_path / "full")
    for key in ("steps", "eval_after", "loss_history", "eval"):
        assert resumed[key] == whole[key], key
