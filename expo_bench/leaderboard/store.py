"""The leaderboard's tables read from the tracking store: every complete run of an experiment, or one sweep's."""

from __future__ import annotations

from collections.abc import Collection

import matplotlib

matplotlib.use("Agg")
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from expo_bench.comparison_settings import StatisticsConfig
from expo_bench.config_model import closest
from expo_bench.errors import UserError
from expo_bench.leaderboard.table import LeaderboardTable, StoredRun, experiment_tables
from expo_bench.tracking import (
    COMPLETE,
    open_client,
    retrying,
    search_all,
    sqlite_path,
)


def _experiments(client: MlflowClient, uri: str, name: str | None) -> list[tuple[str, str]]:
    """(id, name) of the named experiment, or of every active one; a UserError names what exists."""
    existing = [(str(e.experiment_id), e.name) for e in retrying(client.search_experiments, max_results=50000)]
    if name is None:
        return existing
    found = [(experiment_id, known) for experiment_id, known in existing if known == name]
    if not found:
        names = [known for _, known in existing]
        raise UserError(
            f"no experiment {name!r} in the tracking store {uri}{closest(name, names)}; "
            f"experiments there: {', '.join(sorted(names)) or 'none'}"
        )
    return found


def load_leaderboard(
    uri: str,
    experiment: str | None,
    baseline: str | None = "dpo",
    settings: StatisticsConfig | None = None,
    only: Collection[str] | None = None,
) -> list[LeaderboardTable]:
    """The tables of one experiment (None: of every experiment) from the complete child runs in the store (``only``:
    those of these run ids, e.g. one sweep's), each row paired with the ``baseline`` method's row. Where the runs span
    several task instances: one table per instance (seeds paired within it), then the pooled table (instances
    paired)."""
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UserError(f"no tracking store at {database} (URI {uri}): run a recipe first (expo-bench run RECIPE)")
    try:
        client = open_client(uri)
    except MlflowException as error:
        raise UserError(f"cannot read the tracking store {uri}: {error.message}") from error
    tables = []
    for experiment_id, name in _experiments(client, uri, experiment):
        found = search_all(client, [experiment_id], f"tags.`{COMPLETE}` = 'true'")
        runs = [StoredRun.of(run) for run in found if only is None or run.info.run_id in only]
        tables += experiment_tables(uri, name, runs, baseline, settings)
    if not tables:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise UserError(
            f"no complete runs in {where} of the tracking store {uri}: a run counts once its sweep marked it complete"
        )
    return tables
