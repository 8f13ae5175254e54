"""Tracking: a sweep's runs in an SQLite MLflow store, nested, tagged, found again on resume, safe under concurrency."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from expo_bench import metric_keys as keys
from expo_bench import tracking
from expo_bench.tracking import SweepTracker, TrackedRun, flatten_params, resolve_tracking_uri

METHODS = ("dpo", "expo")
LAMS = (0.1, 1.0)
SEEDS = (0, 1, 2)
LONG = "x" * 7000


def win_rate(method: str, lam: float, seed: int) -> float:
    return 0.5 + 0.1 * METHODS.index(method) + 0.01 * LAMS.index(lam) + 0.001 * seed


def run_key(method: str, lam: float, seed: int) -> str:
    return f"{method}-lam{lam:g}-seed{seed}"


def child_tags(method: str, lam: float, seed: int) -> dict[str, str]:
    return {
        tracking.METHOD: method,
        tracking.METHOD_CLASS: f"expo_bench.methods:{method}",
        tracking.DATASET: "tabular",
        tracking.SEED: str(seed),
        tracking.GIT_SHA: "abc123",
        tracking.RECIPE_HASH: "recipe0",
        tracking.CONFIG_KEY: f"{method}-lam{lam:g}",
        tracking.RANK_METRIC: keys.WIN_RATE.key,
        tracking.RANK_GOAL: "max",
        **tracking.version_tags({"torch": "2.13.0"}),
    }


def sqlite_uri(results: Path) -> str:
    """The default store of a results root, whatever $MLFLOW_TRACKING_URI says."""
    return f"sqlite:///{results / 'mlflow.db'}"


RECIPE = {"experiment": "tiny", "methods": [{"name": "dpo", "lam": [0.1, 1.0]}, {"name": "expo"}], "notes": LONG}


def log_sweep(uri: str, experiment: str, sweep_key: str, steps: int = 1, prefix: str = "") -> list[str]:
    """The whole grid, every run complete (run keys ``prefix + run_key``); returns the child run ids."""
    ids = []
    with SweepTracker(uri, experiment, sweep_key, RECIPE, {tracking.RECIPE_HASH: sweep_key}) as sweep:
        for method in METHODS:
            for lam in LAMS:
                for seed in SEEDS:
                    name = f"{method} λ={lam:g} s{seed}"
                    run = sweep.child(prefix + run_key(method, lam, seed), name, {"lam": lam}, child_tags(method, lam, seed))
                    for step in range(steps):
                        run.log_metrics({keys.TRAIN_LOSS: 1.0 / (step + 1), "train/step": float(step)}, step=step)
                    run.log_metrics({keys.WIN_RATE.key: win_rate(method, lam, seed), keys.KL.key: 0.1 * seed})
                    run.mark_complete()
                    ids.append(run.run_id)
    return ids


def runs_by_key(client: MlflowClient, experiment: str) -> dict[str, list[str]]:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found: dict[str, list[str]] = {}
    for run in client.search_runs([experiment_id], max_results=1000):
        if tracking.RUN_KEY in run.data.tags:
            found.setdefault(run.data.tags[tracking.RUN_KEY], []).append(run.info.run_id)
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    uri = sqlite_uri(tmp_path_factory.mktemp("results"))
    ids = log_sweep(uri, "tiny", "recipe0", steps=3)
    return {"uri": uri, "ids": ids, "client": MlflowClient(uri)}


def test_uri_resolution_recipe_then_environment_then_sqlite_in_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, Path("results")) == f"sqlite:///{Path.cwd() / 'results' / 'mlflow.db'}"
    assert tracking.sqlite_path(resolve_tracking_uri(None, tmp_path)) == tmp_path / "mlflow.db"
    assert tracking.sqlite_path("http://tracking:5000") is None


def test_flatten_params_dotted_like_set_overrides_and_truncated_visibly() -> None:
    flat = flatten_params(RECIPE)
    assert flat["methods.0.name"] == "dpo"
    assert flat["methods.0.lam"] == "[0.1, 1.0]"  # a list of scalars stays one readable value
    assert flat["experiment"] == "tiny"
    assert len(flat["notes"]) == 6000 and flat["notes"].endswith(tracking.TRUNCATED)


def test_store_calls_retry_while_the_database_is_locked() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        if len(calls) == 2:  # as MLflow's SQL store wraps it
            cause = sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
            raise MlflowException(str(cause), error_code=TEMPORARILY_UNAVAILABLE) from cause
        return "done"

    assert tracking.retrying(flaky) == "done" and len(calls) == 3

    def broken() -> None:
        calls.append(1)
        cause = sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: runs"))
        raise MlflowException(str(cause), error_code=TEMPORARILY_UNAVAILABLE) from cause

    calls.clear()
    with pytest.raises(MlflowException):
        tracking.retrying(broken)
    assert len(calls) == 1  # not a lock: no retry


def test_sweep_parent_params_and_nested_tagged_children(store: dict[str, Any]) -> None:
    client: MlflowClient = store["client"]
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if tracking.SWEEP_KEY in run.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + len(METHODS) * len(LAMS) * len(SEEDS)
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.SWEEP_KEY] == "recipe0" and parent.data.tags[tracking.RECIPE_HASH] == "recipe0"
    assert parent.data.params["methods.0.lam"] == "[0.1, 1.0]" and parent.data.params["notes"].endswith(tracking.TRUNCATED)
    assert experiment.artifact_location == str(Path(tracking.sqlite_path(store["uri"]) or "").parent / "mlartifacts" / "tiny")
    children = {run.info.run_id: run for run in runs if run is not parent}
    assert sorted(children) == sorted(store["ids"])
    for run in children.values():
        tags = run.data.tags
        method, lam, seed = tags[tracking.METHOD], float(run.data.params["lam"]), int(tags[tracking.SEED])
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags[tracking.RUN_KEY] == run_key(method, lam, seed)
        assert {key: tags[key] for key in child_tags(method, lam, seed)} == child_tags(method, lam, seed)
        assert tags[tracking.COMPLETE] == "true" and run.info.status == "FINISHED"
        assert run.data.metrics[keys.WIN_RATE.key] == pytest.approx(win_rate(method, lam, seed))
        history = client.get_metric_history(run.info.run_id, keys.TRAIN_LOSS)
        assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    view = experiment.tags[tracking._SAVED_VIEW_TAG + tracking.LEADERBOARD_VIEW]
    assert keys.WIN_RATE.key in view and tracking.leaderboard_views(store["uri"]) == {"tiny": experiment.experiment_id}


def test_artifacts_and_tags_land_in_the_run(store: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "report.md").write_text("# report\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.txt").write_text("a")
    run = TrackedRun(store["client"], store["uri"], store["ids"][0], "key", complete=True)
    run.log_artifacts([tmp_path / "report.md", tmp_path / "plots"], artifact_path="eval")
    run.set_tags({"expo_bench.note": "checked"})
    listed = {item.path for item in store["client"].list_artifacts(run.run_id, "eval")}
    assert listed == {"eval/report.md", "eval/plots"}
    assert store["client"].get_run(run.run_id).data.tags["expo_bench.note"] == "checked"
    with pytest.raises(FileNotFoundError):
        run.log_artifacts([tmp_path / "missing.txt"])


def test_lightning_logger_writes_steps_into_the_child_run(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], batch_index: int) -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log(keys.TRAIN_LOSS, loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    uri = sqlite_uri(tmp_path)
    with SweepTracker(uri, "lightning", "sweep", {}, {}) as sweep:
        run = sweep.child("only", "tiny", {"lr": 0.1}, {})
        trainer = pl.Trainer(
            max_steps=2,
            logger=run.logger(),
            log_every_n_steps=1,
            accelerator="cpu",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        data = TensorDataset(torch.randn(4, 2), torch.randn(4, 1))
        environment = os.environ.get("MLFLOW_TRACKING_URI")
        trainer.fit(Tiny(), DataLoader(data, batch_size=2))
        assert os.environ.get("MLFLOW_TRACKING_URI") == environment  # Lightning's export undone: later defaults unaffected
        client = sweep.client
        assert client.get_run(run.run_id).info.status == "FINISHED"  # Lightning's finalize: not evidence of completion
        with SweepTracker(uri, "lightning", "resumed elsewhere", {}, {}) as other:
            assert not other.child("only", "tiny", {"lr": 0.1}, {}).complete
        run.mark_complete()
    history = client.get_metric_history(run.run_id, keys.TRAIN_LOSS)
    assert [metric.step for metric in history] == [0, 1]
    assert client.get_run(run.run_id).data.tags[tracking.COMPLETE] == "true"


def test_interrupted_sweep_resumes_without_duplicates(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)
    grid = [(method, lam, seed) for method in METHODS for lam in LAMS for seed in SEEDS]
    done = {}
    with pytest.raises(RuntimeError), SweepTracker(uri, "resume", "recipe1", RECIPE, {}) as sweep:
        for method, lam, seed in grid[:2]:
            run = sweep.child(run_key(method, lam, seed), "run", {"lam": lam}, child_tags(method, lam, seed))
            run.log_metrics({keys.WIN_RATE.key: win_rate(method, lam, seed)})
            run.mark_complete()
            done[run_key(method, lam, seed)] = run.run_id
        half = sweep.child(run_key(*grid[2]), "run", {"lam": grid[2][1]}, child_tags(*grid[2]))
        half.log_metrics({keys.TRAIN_LOSS: 0.7}, step=0)
        raise RuntimeError("the machine went away")
    client = MlflowClient(uri)
    assert client.get_run(sweep.parent_run_id).info.status == "FAILED"
    assert client.get_run(half.run_id).info.status == "FAILED"  # opened by the sweep, not complete

    with pytest.raises(KeyboardInterrupt), SweepTracker(uri, "resume", "recipe1", RECIPE, {}) as again:
        assert again.parent_run_id == sweep.parent_run_id
        raise KeyboardInterrupt
    assert client.get_run(sweep.parent_run_id).info.status == "KILLED"

    with SweepTracker(uri, "resume", "recipe1", RECIPE, {}) as resumed:
        assert resumed.parent_run_id == sweep.parent_run_id
        for method, lam, seed in grid:
            key = run_key(method, lam, seed)
            run = resumed.child(key, "run", {"lam": lam}, child_tags(method, lam, seed))
            if key in done:
                assert run.complete and run.run_id == done[key]
                continue
            assert not run.complete
            if key == run_key(*grid[2]):
                assert run.run_id == half.run_id
                assert client.get_run(run.run_id).info.status == "RUNNING"
            run.log_metrics({keys.WIN_RATE.key: win_rate(method, lam, seed)})
            run.mark_complete()
    counts = runs_by_key(client, "resume")
    assert sorted(counts) == sorted(run_key(*point) for point in grid)
    assert all(len(ids) == 1 for ids in counts.values())
    assert [metric.value for metric in client.get_metric_history(half.run_id, keys.TRAIN_LOSS)] == [0.7]
    parents = client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id], f"tags.`{tracking.SWEEP_KEY}` = 'recipe1'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def _concurrent_sweep(uri: str, sweep_key: str, barrier: Any) -> None:
    barrier.wait()  # both processes create the store, the experiment and their runs at the same moment
    log_sweep(uri, "shared", sweep_key, steps=10, prefix=f"{sweep_key}/")


def test_two_processes_writing_one_store_lose_nothing(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)  # a fresh store: its schema is created under contention too
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_concurrent_sweep, args=(uri, f"sweep{index}", barrier)) for index in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    client = MlflowClient(uri)
    assert [e.name for e in client.search_experiments() if e.name == "shared"] == ["shared"]
    experiment_id = client.get_experiment_by_name("shared").experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    assert sorted(run.data.tags.get(tracking.SWEEP_KEY, "") for run in runs if tracking.SWEEP_KEY in run.data.tags) == [
        "sweep0",
        "sweep1",
    ]
    counts = runs_by_key(client, "shared")
    grid = [run_key(method, lam, seed) for method in METHODS for lam in LAMS for seed in SEEDS]
    assert sorted(counts) == sorted(f"sweep{index}/{key}" for index in range(2) for key in grid)
    assert all(len(ids) == 1 for ids in counts.values())
    for run in runs:
        tags = run.data.tags
        if tracking.RUN_KEY in tags:
            assert tags[tracking.COMPLETE] == "true"
            expected = win_rate(tags[tracking.METHOD], float(run.data.params["lam"]), int(tags[tracking.SEED]))
            assert run.data.metrics[keys.WIN_RATE.key] == pytest.approx(expected)
            assert [m.step for m in client.get_metric_history(run.info.run_id, keys.TRAIN_LOSS)] == list(range(10))


def test_a_held_store_lock_is_waited_for_with_a_message_then_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from filelock import FileLock

    from expo_bench.errors import UserError

    monkeypatch.setattr(tracking, "STORE_WAIT_S", 0.3)
    with FileLock(f"{tmp_path / 'mlflow.db'}.lock"), pytest.raises(UserError, match=r"another process held .* for 0\.3 s"):
        tracking.open_client(sqlite_uri(tmp_path))  # another sweep in the middle of a get-or-create
    assert "waiting for the tracking store" in caplog.text
