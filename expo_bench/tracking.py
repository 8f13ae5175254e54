"""Experiment tracking in MLflow: an experiment per recipe experiment, a parent run per sweep, a child run per
(method, hyperparameters, seed), found again by its key so a resumed or repeated sweep never records a run twice.

With no URI configured the store is ``<results>/mlflow.db`` (SQLite: no server to start; ``expo-bench ui`` browses it),
artifacts beside it in ``<results>/mlartifacts/<experiment>/``. Several processes may write one SQLite store at once:
store calls retry while the database is locked, and get-or-create steps hold a lock file so no run is created twice.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, TEMPORARILY_UNAVAILABLE, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from expo_bench.cache import locked
from expo_bench.errors import UserError
from expo_bench.metric_keys import LEADERBOARD_COLUMNS

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.entities import Run

# Tags of a child run, supplied by the caller (``expo_bench.`` keys; MLflow's own run name tag is set from ``name``).
METHOD = "expo_bench.method"
"""The method's label in the recipe (one leaderboard row per label)."""
METHOD_CLASS = "expo_bench.method_class"
DATASET = "expo_bench.dataset"
"""One leaderboard table per dataset."""
MODEL = "expo_bench.model"
JUDGE = "expo_bench.judge"
SEED = "expo_bench.seed"
INSTANCE = "expo_bench.instance"
"""The task instance (e.g. the synthetic-token task's reward table) a run trained on, where a recipe runs several: seeds
pair within an instance, and instances are the replication unit of a pooled comparison. Absent: one instance."""
GIT_SHA = "expo_bench.git_sha"
RECIPE_HASH = "expo_bench.recipe_hash"
DATA_FINGERPRINT = "expo_bench.data_fingerprint"
MODEL_FINGERPRINT = "expo_bench.model_fingerprint"
PACKAGE_VERSION = "expo_bench.version."
"""Prefix: ``expo_bench.version.torch`` = ``2.13.0``; see :func:`version_tags`."""
CONFIG_KEY = "expo_bench.config_key"
"""Hash of the hyperparameters without the seed: the runs of one configuration, averaged over seeds."""
RANK_METRIC = "expo_bench.rank_metric"
"""A key of :mod:`expo_bench.metric_keys` that picks a method's best configuration."""
RANK_GOAL = "expo_bench.rank_goal"
"""``max`` or ``min``: the direction of the rank metric."""
SELECTION_METRIC = "expo_bench.selection_metric"
"""The metric, computed on prompts set aside for it, that picks a method's best configuration (``selection/...``)."""
REGULARIZATION = "expo_bench.regularization"
"""The method's hyperparameter that plays the paper's λ (``beta`` for DPO): the leaderboard shows λ for every method."""

# Tags the tracker itself sets.
SWEEP_KEY = "expo_bench.sweep_key"
RUN_KEY = "expo_bench.run_key"
COMPLETE = "expo_bench.complete"
"""``true`` once :meth:`TrackedRun.mark_complete` ran; MLflow's status cannot tell, Lightning sets FINISHED after fit."""

LEADERBOARD_VIEW = "leaderboard"
"""Saved view of the MLflow UI's runs table with the leaderboard columns: ``#/experiments/<id>?viewStateShareKey=leaderboard``."""
_SAVED_VIEW_TAG = "mlflow.sharedViewState."  # the UI's saved views: one experiment tag each, a JSON envelope
_PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"  # the UI charts it first
_PRIMARY_METRIC_GREATER_TAG = "mlflow.experiment.primaryMetric.greaterIsBetter"
_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # without it the UI asks whether the experiment is GenAI or model training

TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
TRUNCATED = "…[truncated]"
RETRY_ATTEMPTS = 10
BACKOFF_CAP_S = 5.0
STORE_WAIT_S = 300.0
"""The longest wait for the store lock or a locked SQLite store before giving up with a message."""
FAILURE = "expo_bench.failure"
"""Why a run failed (a diverged loss, say): such a run is never complete, so never reused or ranked."""

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def resolve_tracking_uri(config_uri: str | None, results_root: Path) -> str:
    """The recipe's URI, else ``$MLFLOW_TRACKING_URI``, else an SQLite file in the results root."""
    if config_uri:
        return config_uri
    if environment := os.environ.get(TRACKING_URI_VARIABLE):
        return environment
    return f"sqlite:///{Path(results_root).absolute() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI (relative or absolute), None for any other store or in-memory."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def version_tags(versions: Mapping[str, str]) -> dict[str, str]:
    """``{"torch": "2.13.0"}`` as child tags: ``{"expo_bench.version.torch": "2.13.0"}``."""
    return {PACKAGE_VERSION + name: version for name, version in versions.items()}


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys as ``--set`` takes them (``methods.0.params.beta``); a list of scalars stays one value.

    Values longer than MLflow's limit end in ``…[truncated]``.
    """
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list | tuple) and any(isinstance(item, Mapping | list | tuple) for item in value):
            flat.update(flatten_params({str(index): item for index, item in enumerate(value)}, f"{name}."))
        else:
            text = str(value)  # str() as Lightning's MLFlowLogger writes hyperparameters: equal values, no conflict
            flat[name] = text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
    return flat


def _transient(error: BaseException) -> bool:
    """A locked SQLite database (anywhere in the cause chain), or a server that answers "temporarily unavailable"."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, sqlite3.OperationalError | sqlalchemy.exc.OperationalError):
            return "locked" in str(seen) or "busy" in str(seen)  # not e.g. "no such table", which MLflow wraps alike
        seen = seen.__cause__ or seen.__context__
    return isinstance(error, MlflowException) and error.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE)


def retrying(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``call(*args, **kwargs)``, again after a jittered, growing pause while the store is locked.

    MLflow already waits 20 s on a locked SQLite database (``PRAGMA busy_timeout``), but SQLite fails at once when
    waiting could deadlock (two transactions upgrading from read to write): those are the failures retried here.
    """
    for attempt in range(RETRY_ATTEMPTS - 1):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if not _transient(error):
                raise
            time.sleep(random.uniform(0, min(BACKOFF_CAP_S, 0.05 * 2**attempt)))  # full jitter: writers drift apart
    return call(*args, **kwargs)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive across processes for an SQLite store (a lock file beside it); held only for short get-or-create steps,
    so waiting for it says so and gives up after :data:`STORE_WAIT_S`.

    Nothing for other stores: two sweeps running the same run keys against one tracking server at the same moment
    could each create the run.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with locked(Path(f"{path}.lock"), f"the tracking store {path}", STORE_WAIT_S):
        yield


def check_store(uri: str) -> None:
    """:class:`UserError` unless an existing SQLite store can be read: not a database (corrupt, or another file), or
    locked by another process for longer than :data:`STORE_WAIT_S`. Run before anything is written."""
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return
    if not path.is_file():
        raise UserError(f"the tracking store {path} is not a file (URI {uri})")
    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=0)) as database:
            try:
                database.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as error:
                if "locked" not in str(error):
                    raise
                log.warning("waiting for the tracking store %s: another process holds it (at most %g s)", path, STORE_WAIT_S)
                database.execute(f"PRAGMA busy_timeout = {int(STORE_WAIT_S * 1000)}")
                database.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as error:
        if "locked" in str(error):
            raise UserError(f"the tracking store {path} stayed locked by another process for {STORE_WAIT_S:g} s") from None
        raise UserError(
            f"the tracking store {path} cannot be read as an SQLite database ({error}): move it aside, or point "
            "tracking.uri (or MLFLOW_TRACKING_URI) at another store"
        ) from None


def open_client(uri: str) -> MlflowClient:
    """A client whose store exists: a fresh SQLite file gets its schema from one process at a time."""
    check_store(uri)
    with store_lock(uri):
        return retrying(MlflowClient, uri)  # the constructor builds the store (cached per URI): a fresh file gets its tables


def leaderboard_views(uri: str) -> dict[str, str]:
    """Experiment name → id, of the experiments that have the saved view :data:`LEADERBOARD_VIEW`."""
    experiments = retrying(open_client(uri).search_experiments, max_results=50000)
    return {e.name: str(e.experiment_id) for e in experiments if _SAVED_VIEW_TAG + LEADERBOARD_VIEW in e.tags}


def _literal(value: str) -> str:
    """A string literal of MLflow's search syntax."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"a run key may not contain both quote characters: {value!r}")


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    """Every active run that matches, oldest first (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = retrying(
            client.search_runs,
            experiment_ids,
            filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: list[Metric] | None = None,
    params: list[Param] | None = None,
    tags: list[RunTag] | None = None,
) -> None:
    """One ``log_batch`` per chunk within MLflow's limits."""
    metrics, params, tags = metrics or [], params or [], tags or []
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        retrying(client.log_batch, run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
    for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        retrying(client.log_batch, run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
        retrying(client.log_batch, run_id, tags=tags[start : start + MAX_PARAMS_TAGS_PER_BATCH])


@cache
def _retrying_logger_class() -> type[MLFlowLogger]:
    """Lightning's MLflow logger, retrying while the database is locked and leaving the environment as it found it.

    Built on first use: importing Lightning is slow, and the leaderboard and UI commands never train.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    class RetryingMLFlowLogger(MLFlowLogger):
        @property
        def experiment(self) -> Any:
            # Lightning calls mlflow.set_tracking_uri, which exports $MLFLOW_TRACKING_URI: the next recipe in this
            # process would resolve its default store to this one
            before = os.environ.get(TRACKING_URI_VARIABLE)
            try:
                return super().experiment
            finally:
                if before is None:
                    os.environ.pop(TRACKING_URI_VARIABLE, None)
                else:
                    os.environ[TRACKING_URI_VARIABLE] = before

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            retrying(super().log_metrics, metrics, step)

        def log_hyperparams(self, params: Any) -> None:
            retrying(super().log_hyperparams, params)

        def finalize(self, status: str = "success") -> None:
            retrying(super().finalize, status)

    return RetryingMLFlowLogger


class TrackedRun:
    """A child run of a sweep: train through :meth:`logger`, log evaluation metrics, then :meth:`mark_complete`."""

    def __init__(self, client: MlflowClient, uri: str, run_id: str, key: str, complete: bool) -> None:
        self._client = client
        self.uri = uri
        self.run_id = run_id
        self.key = key
        self._complete = complete

    @property
    def complete(self) -> bool:
        """Whether :meth:`mark_complete` ran for this run (in this sweep or an earlier one)."""
        return self._complete

    def logger(self) -> MLFlowLogger:
        """A Lightning logger writing into this run (no checkpoints uploaded as artifacts)."""
        return _retrying_logger_class()(tracking_uri=self.uri, run_id=self.run_id, log_model=False)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        _log_batch(
            self._client, self.run_id, metrics=[Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()]
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        _log_batch(self._client, self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifacts(self, paths: Iterable[Path | str], artifact_path: str | None = None) -> None:
        """Files, and directories under their own name, into ``artifact_path`` of the run's artifacts."""
        for path in map(Path, paths):
            if path.is_dir():
                into = f"{artifact_path}/{path.name}" if artifact_path else path.name
                retrying(self._client.log_artifacts, self.run_id, str(path), into)
            elif path.is_file():
                retrying(self._client.log_artifact, self.run_id, str(path), artifact_path)
            else:
                raise FileNotFoundError(f"no artifact to log at {path}")

    def refresh(self) -> None:
        """Read again whether the run is complete: another process may have completed it since it was opened."""
        self._complete = retrying(self._client.get_run, self.run_id).data.tags.get(COMPLETE) == "true"

    def mark_failed(self, reason: str) -> None:
        """Record why the run failed; it stays incomplete, so a later sweep trains it again and no leaderboard ranks it."""
        self.set_tags({FAILURE: reason[:MAX_PARAM_VAL_LENGTH]})
        retrying(self._client.set_terminated, self.run_id, "FAILED")

    def mark_complete(self) -> None:
        """Record that training and evaluation finished: a later sweep reuses this run as done."""
        self.set_tags({COMPLETE: "true"})
        retrying(self._client.set_terminated, self.run_id, "FINISHED")
        self._complete = True


class RankMirror(TrackedRun):
    """A tracked run as the ranks other than zero see it: rank zero records everything, these calls record nothing
    (the Lightning logger it hands out logs on rank zero only, as Lightning's loggers do)."""

    def __init__(self, uri: str, run_id: str, key: str, complete: bool) -> None:
        super().__init__(None, uri, run_id, key, complete)  # type: ignore[arg-type]

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifacts(self, paths: Iterable[Path | str], artifact_path: str | None = None) -> None:
        pass

    def refresh(self) -> None:
        pass

    def mark_failed(self, reason: str) -> None:
        pass

    def mark_complete(self) -> None:
        self._complete = True


@dataclass(frozen=True)
class RunLog:
    """What a task needs to record its runs: the sweep, and the tags every run of the sweep carries."""

    sweep: SweepTracker
    tags: Mapping[str, str]

    def child(self, key: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> TrackedRun:
        return self.sweep.child(key, name, params, {**self.tags, **tags})


class SweepTracker:
    """A parent run for one sweep of a recipe experiment, reused when a sweep with the same key runs again.

    On exit the parent is FINISHED, or FAILED (KILLED after Ctrl-C) when an exception escapes; the children this sweep
    opened but did not complete end FAILED (KILLED after Ctrl-C).
    """

    def __init__(self, uri: str, experiment: str, sweep_key: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self.uri = uri
        self.experiment = experiment
        self.sweep_key = sweep_key
        self._params = flatten_params(params)
        self._tags = dict(tags)
        self._client: MlflowClient | None = None
        self.experiment_id = ""
        self.parent_run_id = ""
        self._opened: dict[str, TrackedRun] = {}
        self._view_saved = False

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            raise RuntimeError("use the SweepTracker as a context manager: with SweepTracker(...) as sweep:")
        return self._client

    def __enter__(self) -> SweepTracker:
        self._client = open_client(self.uri)
        with store_lock(self.uri):
            self.experiment_id = self._experiment_id()
            self.parent_run_id, _ = self._run(SWEEP_KEY, self.sweep_key, f"sweep {self.sweep_key}", self._params, self._tags, {})
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        interrupted = kind is not None and issubclass(kind, (KeyboardInterrupt, SystemExit))  # Ctrl-C, SIGTERM
        for run in self._opened.values():
            if not run.complete:
                retrying(self.client.set_terminated, run.run_id, "KILLED" if interrupted else "FAILED")
        retrying(self.client.set_terminated, self.parent_run_id, "KILLED" if interrupted else "FAILED" if kind else "FINISHED")

    @property
    def opened(self) -> frozenset[str]:
        """The run ids of the children this sweep opened (new, resumed or reused): the recipe's own runs."""
        return frozenset(self._opened)

    @property
    def parent(self) -> TrackedRun:
        """The sweep's own run: the recipe, the summary, tables and plots go there."""
        return TrackedRun(self.client, self.uri, self.parent_run_id, self.sweep_key, False)

    def child(self, key: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> TrackedRun:
        """The run recorded under ``key`` anywhere in the experiment (complete or not), else a new one under the parent."""
        with store_lock(self.uri):
            run_id, complete = self._run(
                RUN_KEY, key, name, flatten_params(params), dict(tags), {MLFLOW_PARENT_RUN_ID: self.parent_run_id}
            )
            if RANK_METRIC in tags and not self._view_saved:
                self._save_leaderboard_view(tags[RANK_METRIC], tags.get(RANK_GOAL, "max"))
        return self._opened.setdefault(run_id, TrackedRun(self.client, self.uri, run_id, key, complete))

    def _experiment_id(self) -> str:
        experiment = retrying(self.client.get_experiment_by_name, self.experiment)
        if experiment is None:
            database = sqlite_path(self.uri)
            # MLflow's default would be ./mlruns under whatever directory the sweep was started from
            location = str(database.absolute().parent / "mlartifacts" / self.experiment) if database else None
            try:
                return retrying(
                    self.client.create_experiment, self.experiment, location, {_EXPERIMENT_KIND_TAG: "custom_model_development"}
                )
            except MlflowException as error:
                if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                experiment = retrying(self.client.get_experiment_by_name, self.experiment)  # created by a concurrent sweep
                assert experiment is not None
        if experiment.lifecycle_stage == "deleted":
            raise UserError(
                f"experiment {self.experiment!r} is deleted in the tracking store {self.uri}: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or rename the recipe's experiment"
            )
        return str(experiment.experiment_id)

    def _run(
        self, key_tag: str, key: str, name: str, params: dict[str, str], tags: dict[str, str], fixed_tags: dict[str, str]
    ) -> tuple[str, bool]:
        """Get or create the run tagged ``key_tag == key`` (caller holds the store lock); returns (run id, complete).

        A complete run is left as it was. An incomplete one runs again: status RUNNING, the current tags, and the params it
        lacks (MLflow refuses to change a logged param).
        """
        found = search_all(self.client, [self.experiment_id], f"tags.`{key_tag}` = {_literal(key)}")
        complete = [run for run in found if run.data.tags.get(COMPLETE) == "true"]
        if complete:
            return complete[0].info.run_id, True
        if found:
            run_id = found[0].info.run_id
            retrying(self.client.update_run, run_id, "RUNNING")
            logged = found[0].data.params
        else:
            run_id = retrying(
                self.client.create_run, self.experiment_id, tags={key_tag: key, **fixed_tags}, run_name=name
            ).info.run_id
            logged = {}
        _log_batch(
            self.client,
            run_id,
            params=[Param(k, v) for k, v in params.items() if k not in logged],
            tags=[RunTag(k, v) for k, v in {**tags, **fixed_tags, key_tag: key}.items()],
        )
        return run_id, False

    def _save_leaderboard_view(self, rank_metric: str, goal: str) -> None:
        """The UI's runs table with the leaderboard columns, sorted by the rank metric (caller holds the store lock).

        An existing view is kept: the user may have edited it in the UI.
        """
        experiment = retrying(self.client.get_experiment, self.experiment_id)
        now = int(time.time() * 1000)
        state = {
            "selectedColumns": [f"tags.`{tag}`" for tag in (METHOD, DATASET, SEED)]
            + [f"metrics.`{column.key}`" for column in LEADERBOARD_COLUMNS],
            "orderByKey": f"metrics.`{rank_metric}`",
            "orderByAsc": goal == "min",
        }
        wanted = {
            _SAVED_VIEW_TAG + LEADERBOARD_VIEW: json.dumps(
                {"name": "leaderboard", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
            ),
            _PRIMARY_METRIC_TAG: rank_metric,
            _PRIMARY_METRIC_GREATER_TAG: str(goal == "max"),
        }
        for key, value in wanted.items():
            if key not in experiment.tags:
                try:
                    retrying(self.client.set_experiment_tag, self.experiment_id, key, value)
                except MlflowException:
                    # a tracking server has no store lock: a concurrent sweep may have set it first
                    if key not in retrying(self.client.get_experiment, self.experiment_id).tags:
                        raise
        self._view_saved = True
