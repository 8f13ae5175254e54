"""The leaderboard, generated from the tracking store and never edited by hand.

One table per (experiment, dataset): each method's best configuration, every leaderboard metric as mean ± 95% CI over
seeds (Student t), the rank metric's paired per-seed difference from a baseline method (Holm-adjusted over the column,
with an exact sign-flip p), which methods a test cannot tell from the best one and which an equivalence test (TOST)
shows within a margin of it, and where each number came from (runs, git sha, recipe hash, parameters). With several
task instances: one table per instance and a pooled one whose unit is the instance. Where the runs logged a selection
metric (on evaluation prompts set aside for it) the best configuration is picked on that, never on the reported
numbers; otherwise it is picked on the reported metric and the caption says it is optimistic. A pick at the edge of
its grid is flagged. docs/statistics.md says which test backs which mark.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import transforms
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from rich.console import Console
from scipy import stats

from expo_bench.comparison import (
    SIGNIFICANCE,
    Equivalence,
    PairedDifference,
    equivalence,
    grid_edges,
    holm,
    leave_one_out_pick,
    paired_difference,
)
from expo_bench.comparison_settings import StatisticsConfig
from expo_bench.config_model import closest
from expo_bench.errors import UserError
from expo_bench.metric_keys import (
    CATALOG,
    DISTINCT_2,
    JUDGED,
    KL,
    KL_STDERR,
    LC_WIN_RATE,
    LEADERBOARD_COLUMNS,
    MEAN_LENGTH,
    REWARD,
    WIN_RATE,
    WIN_RATE_STDERR,
    Goal,
    Metric,
    at_temperature,
    panel_columns,
    standard_error_key,
)
from expo_bench.reporting import Z_95, markdown_table, method_style, rich_table, with_interval
from expo_bench.tracking import (
    COMPLETE,
    CONFIG_KEY,
    DATASET,
    GIT_SHA,
    INSTANCE,
    JUDGE,
    METHOD,
    RANK_GOAL,
    RANK_METRIC,
    RECIPE_HASH,
    REGULARIZATION,
    SEED,
    SELECTION_METRIC,
    open_client,
    retrying,
    search_all,
    sqlite_path,
)

LAM = "lam"
"""The run param that the λ-sweep plot puts on its x-axis."""
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds and the half-width of its 95% Student-t interval (None with one seed)."""

    mean: float
    half_width: float | None
    n: int


def estimate(values: Sequence[float]) -> Estimate:
    """mean ± t_{0.975, n−1} · sd / √n, sd with n − 1 degrees of freedom."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2 or not math.isfinite(mean):  # a NaN or infinite value has no spread to speak of
        return Estimate(mean, None, n)
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Estimate(mean, half_width, n)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]

    @classmethod
    def of(cls, run: Run) -> RunRecord:
        return cls(run.info.run_id, dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))


@dataclass(frozen=True)
class Configuration:
    """The seeds of one method's hyperparameter configuration (tag ``expo_bench.config_key``)."""

    method: str
    config_key: str
    runs: tuple[RunRecord, ...]

    @cached_property
    def instances(self) -> tuple[str, ...]:
        """The task instances its runs span (none tagged: a recipe with one instance)."""
        return tuple(sorted({run.tags[INSTANCE] for run in self.runs if INSTANCE in run.tags}))

    @cached_property
    def estimates(self) -> dict[str, Estimate]:
        """Every metric the runs logged, over the runs that logged it; where they span several task instances, over the
        instances' means (:meth:`by_unit`)."""
        keys = dict.fromkeys(key for run in self.runs for key in run.metrics)
        if len(self.instances) > 1:
            return {key: estimate(list(self.by_unit(key).values())) for key in keys}
        return {key: estimate([run.metrics[key] for run in self.runs if key in run.metrics]) for key in keys}

    @cached_property
    def params(self) -> dict[str, str]:
        """The params all its runs share (the seed, where it is a param, differs and is left out)."""
        first = self.runs[0].params
        return {key: value for key, value in sorted(first.items()) if all(run.params.get(key) == value for run in self.runs)}

    @cached_property
    def rank(self) -> tuple[str, Goal]:
        """The rank metric its runs were tagged with (the most common), else the first leaderboard column logged; its
        goal from the metric catalog, or from the runs' tag for a metric the catalog does not name."""
        tagged = Counter((run.tags[RANK_METRIC], run.tags.get(RANK_GOAL, "max")) for run in self.runs if RANK_METRIC in run.tags)
        if tagged:
            metric, goal = tagged.most_common(1)[0][0]
            known = CATALOG.get(metric)
            return metric, known.goal if known is not None else "min" if goal == "min" else "max"
        column = next((column for column in LEADERBOARD_COLUMNS if column.key in self.estimates), LEADERBOARD_COLUMNS[0])
        return column.key, column.goal

    @cached_property
    def selection(self) -> tuple[str, Goal] | None:
        """The metric its runs were tagged to be picked by (on prompts set aside for it) and its goal, if they logged it."""
        tagged = Counter(run.tags[SELECTION_METRIC] for run in self.runs if SELECTION_METRIC in run.tags)
        if not tagged:
            return None
        metric = tagged.most_common(1)[0][0]
        if metric not in self.estimates:
            return None
        known = CATALOG.get(f"eval/{metric.split('/', 1)[1]}")
        return metric, known.goal if known is not None else self.rank[1]

    def by_unit(self, metric: str) -> dict[str, float]:
        """``{replication unit: value}`` of one metric, what paired tests pair: the seed (runs without a seed tag are
        left out); where the runs span several task instances, the instance, valued at the mean over its seeds. Seeds
        are nested in an instance (seed 0 of two instances shares nothing), so across instances the instance is what
        replicates the task."""
        if len(self.instances) <= 1:
            return {run.tags[SEED]: run.metrics[metric] for run in self.runs if SEED in run.tags and metric in run.metrics}
        grouped: dict[str, list[float]] = defaultdict(list)
        for run in self.runs:
            if INSTANCE in run.tags and metric in run.metrics:
                grouped[run.tags[INSTANCE]].append(run.metrics[metric])
        return {instance: statistics.fmean(values) for instance, values in sorted(grouped.items())}

    def provenance(self, tag: str) -> list[str]:
        return list(dict.fromkeys(run.tags[tag] for run in self.runs if tag in run.tags))


GRID_PARAMS = ("params.", "train.")
"""Run params that a recipe's grids vary (``lam`` mirrors a ``params.`` field and is left out)."""


@dataclass(frozen=True)
class RowVerdict:
    """How one method's row was chosen and how it compares."""

    selected_by: str
    """The metric its configuration was picked on."""
    edges: list[str]
    """Hyperparameters whose picked value is the lowest or highest its grid tried."""
    versus_baseline: PairedDifference | None
    """Rank metric, this method − the baseline method, paired by unit (seed, or task instance)."""
    baseline_p_holm: float | None
    """Holm-adjusted p-value of ``versus_baseline`` over the column (every row compared with the baseline)."""
    versus_best: PairedDifference | None
    """Rank metric, this method − the best row, paired by unit (None for the best row itself)."""
    best_p_holm: float | None
    """Holm-adjusted p-value of ``versus_best`` over every row compared with the best."""
    equivalent_to_best: Equivalence | None = None
    """TOST of this row and the best at the table's equivalence margin (None: the best row, or no margin)."""
    leave_one_seed_out: Estimate | None = None
    """The rank metric when each seed's configuration is picked on the other seeds' selection metric (where asked)."""

    @property
    def not_distinguishable_from_best(self) -> bool:
        """True for the best row, and for rows the paired tests (Holm-corrected, 5%) cannot tell from it. A failure to
        reject, not a finding of equality: that is :attr:`equivalent_to_best`'s to show."""
        return self.versus_best is None or self.best_p_holm is None or self.best_p_holm >= SIGNIFICANCE


def _sort_key(metric: str, goal: Goal) -> Callable[[Configuration], tuple[bool, float, int, str, str]]:
    """Best first: configurations lacking the metric last, then more seeds, then by name (deterministic ties)."""

    def key(configuration: Configuration) -> tuple[bool, float, int, str, str]:
        found = configuration.estimates.get(metric)
        value = math.inf if found is None else -found.mean if goal == "max" else found.mean
        return found is None, value, -len(configuration.runs), configuration.method, configuration.config_key

    return key


@dataclass(frozen=True)
class LeaderboardTable:
    """One (experiment, dataset): the best configuration per method, best first, and all configurations."""

    store: str
    experiment: str
    dataset: str
    rank_metric: str
    rank_goal: Goal
    columns: tuple[Metric, ...]
    rows: tuple[Configuration, ...]
    configurations: tuple[Configuration, ...]
    verdicts: dict[str, RowVerdict]
    """By method."""
    baseline: str | None
    """The method every row is paired with (None: not in this table)."""
    equivalence_margin: float | None = None
    """The ± margin of the equivalence tests against the best row, in the rank metric's units (None: none run)."""
    instances: tuple[str, ...] = ()
    """The task instances its runs span (several: a pooled table whose unit is the instance; none: not tagged)."""

    unranked: tuple[str, ...] = ()
    """Methods left out: every configuration's picking or rank metric is non-finite (NaN, ±inf) or missing."""


def _finite(configuration: Configuration, key: str) -> bool:
    found = configuration.estimates.get(key)
    return found is not None and math.isfinite(found.mean)


def _pick(candidates: list[Configuration], rank: tuple[str, Goal]) -> tuple[Configuration, str] | None:
    """A method's configuration: the best by its selection metric when every candidate logged one, else by ``rank``;
    never one whose picking or rank metric is non-finite (None: no candidate is left)."""
    selections = {configuration.selection for configuration in candidates}
    selection = selections.pop() if len(selections) == 1 else None
    by = selection or rank
    rankable = [c for c in candidates if _finite(c, by[0]) and _finite(c, rank[0])]
    return (min(rankable, key=_sort_key(*by)), by[0]) if rankable else None


class NothingToRank(UserError):
    """A table none of whose configurations has a finite rank metric."""


def build_table(
    store: str,
    experiment: str,
    dataset: str,
    runs: Sequence[RunRecord],
    baseline: str | None = "dpo",
    settings: StatisticsConfig | None = None,
) -> LeaderboardTable:
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[run.tags.get(METHOD, run.tags.get("mlflow.runName", run.run_id)), run.tags.get(CONFIG_KEY, run.run_id)].append(run)
    configurations = [Configuration(method, key, tuple(members)) for (method, key), members in sorted(groups.items())]
    by_method: dict[str, list[Configuration]] = defaultdict(list)
    for configuration in configurations:
        by_method[configuration.method].append(configuration)
    ranks = {method: Counter(c.rank for c in candidates).most_common(1)[0][0] for method, candidates in by_method.items()}
    picks = {method: _pick(candidates, ranks[method]) for method, candidates in by_method.items()}
    picked = {method: found for method, found in picks.items() if found is not None}
    if not picked:
        raise NothingToRank(f"{experiment} · {dataset}: every configuration's rank metric is non-finite or missing")
    rank_metric, rank_goal = Counter(ranks.values()).most_common(1)[0][0]  # methods may disagree: the majority sorts
    rows = sorted((best for best, _ in picked.values()), key=_sort_key(rank_metric, rank_goal))
    logged = {key for row in rows for key in row.estimates}
    columns = (*(column for column in LEADERBOARD_COLUMNS if column.key in logged), *panel_columns(logged))
    if rank_metric not in {column.key for column in columns}:
        columns = (Metric(rank_metric, rank_metric, rank_goal), *columns)
    settings = settings or StatisticsConfig()
    baseline_row = next((row for row in rows if row.method == baseline), None)
    versus_best = {row.method: paired_difference(row.by_unit(rank_metric), rows[0].by_unit(rank_metric)) for row in rows[1:]}
    versus_baseline = {
        row.method: paired_difference(row.by_unit(rank_metric), baseline_row.by_unit(rank_metric))
        for row in rows
        if baseline_row is not None and row is not baseline_row
    }
    best_gap = versus_baseline.get(rows[0].method)
    margin = settings.margin(None if best_gap is None else best_gap.mean)
    baseline_adjusted, best_adjusted = _holm(versus_baseline), _holm(versus_best)
    verdicts = {
        row.method: RowVerdict(
            selected_by=picked[row.method][1],
            edges=grid_edges(
                {key: value for key, value in row.params.items() if key.startswith(GRID_PARAMS)},
                [candidate.params for candidate in by_method[row.method]],
            ),
            versus_baseline=versus_baseline.get(row.method),
            baseline_p_holm=baseline_adjusted.get(row.method),
            versus_best=versus_best.get(row.method),
            best_p_holm=best_adjusted.get(row.method),
            equivalent_to_best=None
            if margin is None or row is rows[0]
            else equivalence(row.by_unit(rank_metric), rows[0].by_unit(rank_metric), margin),
            leave_one_seed_out=_leave_one_seed_out(by_method[row.method], rank_metric, rank_goal)
            if settings.leave_one_seed_out
            else None,
        )
        for row in rows
    }
    return LeaderboardTable(
        store,
        experiment,
        dataset,
        rank_metric,
        rank_goal,
        columns,
        tuple(rows),
        tuple(configurations),
        verdicts,
        None if baseline_row is None else baseline,
        margin,
        tuple(sorted({instance for row in rows for instance in row.instances})),
        tuple(sorted(method for method, found in picks.items() if found is None)),
    )


def _holm(column: dict[str, PairedDifference | None]) -> dict[str, float]:
    """Holm-adjusted p-values of a column of paired comparisons (those with a p-value)."""
    return holm({method: found.p_value for method, found in column.items() if found and found.p_value is not None})


def _leave_one_seed_out(candidates: list[Configuration], rank_metric: str, goal: Goal) -> Estimate | None:
    """The rank metric over units when each unit's configuration is picked on the others' selection metric (in a pooled
    table the unit is the task instance: one instance is left out at a time)."""
    selections = {configuration.selection for configuration in candidates}
    selection = selections.pop() if len(selections) == 1 else None
    if selection is None:
        return None
    picked = leave_one_out_pick(
        {c.config_key: c.by_unit(selection[0]) for c in candidates},
        {c.config_key: c.by_unit(rank_metric) for c in candidates},
        selection[1],
    )
    return estimate(list(picked.values())) if picked else None


def experiment_tables(
    store: str, experiment: str, runs: Sequence[RunRecord], baseline: str | None, settings: StatisticsConfig | None = None
) -> list[LeaderboardTable]:
    """One table per dataset; where a dataset's runs span several task instances, one per instance (seeds paired
    within it) before the pooled one (instances paired)."""
    by_dataset: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_dataset[run.tags.get(DATASET, "unknown")].append(run)
    tables: list[LeaderboardTable] = []
    skipped: list[str] = []
    for dataset, members in sorted(by_dataset.items()):
        by_instance: dict[str, list[RunRecord]] = defaultdict(list)
        for run in members:
            by_instance[run.tags.get(INSTANCE, "")].append(run)
        names = sorted(by_instance, key=lambda name: (len(name), name)) if len(by_instance) > 1 else []  # 2 before 10
        for group in [*(by_instance[name] for name in names), members]:  # the pooled table last
            try:
                tables.append(build_table(store, experiment, dataset, group, baseline, settings))
            except NothingToRank as error:
                skipped.append(str(error))
    if skipped and not tables:
        raise UserError(f"nothing to rank: {'; '.join(skipped)}")
    return tables


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
        runs = [RunRecord.of(run) for run in found if only is None or run.info.run_id in only]
        tables += experiment_tables(uri, name, runs, baseline, settings)
    if not tables:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise UserError(
            f"no complete runs in {where} of the tracking store {uri}: a run counts once its sweep marked it complete"
        )
    return tables


def _spread(row: Configuration, key: str, stderr_key: str | None = None) -> Estimate | None:
    """A metric's mean ± half-width over seeds (Student t), or with one seed ± Z_95 × the run's own standard error
    over prompts where it logged one (win rate, reward, KL, a judge's audit: ``stderr_key`` or the metric's
    :func:`~expo_bench.metric_keys.standard_error_key`), so that a single seed still shows its uncertainty."""
    found = row.estimates.get(key)
    if found is None or found.half_width is not None:
        return found
    within = row.estimates.get(stderr_key or standard_error_key(key))
    if within is None or not math.isfinite(within.mean):
        return found
    return Estimate(found.mean, Z_95 * within.mean, found.n)


def _cell(found: Estimate | None, spread: bool = True) -> str:
    return "—" if found is None else with_interval(found.mean, found.half_width if spread else None)


def _lam(row: Configuration) -> str:
    """The method's λ, whichever hyperparameter plays it (DPO's β, IPO's τ, EXPO's λ); — for a method without one."""
    regularization = next((run.tags[REGULARIZATION] for run in row.runs if REGULARIZATION in run.tags), None)
    for key in (LAM, f"params.{regularization}"):
        try:
            return f"{float(row.params[key]):g}"
        except (KeyError, ValueError):
            continue
    return "—"


def _params_text(params: dict[str, str]) -> str:
    """The method's hyperparameters (``params.*``); the full configuration is in the CSV and the store."""
    shown = {key.removeprefix("params."): value for key, value in params.items() if key.startswith("params.")}
    return ", ".join(f"{key}={value}" for key, value in shown.items()) or "—"


def _difference(found: PairedDifference | None, p_holm: float | None) -> str:
    """``-0.51 ± 0.48 (Holm p 0.13; sign-flip p 0.12)``: a paired difference, its CI half-width, the t-test's p-value
    Holm-adjusted over the column and the exact sign-flip p-value (the raw t-test p is in the CSV)."""
    if found is None:
        return "—"
    spread = "" if found.half_width is None else f" ± {found.half_width:.2g}"
    tests = [f"{name} p {p:.2g}" for name, p in (("Holm", p_holm), ("sign-flip", found.sign_flip_p)) if p is not None]
    return f"{found.mean:+.3g}{spread}" + (f" ({'; '.join(tests)})" if tests else "")


LC_MIN_JUDGED = 50
"""Fewer judged comparisons than this and the length-controlled GLM (three coefficients) is mostly noise."""
LC_SATURATED = 0.01
"""An LC win rate this close to 0 or 1 beside a raw rate that is not: the GLM separated, it did not measure."""


def lc_warning(row: Configuration) -> str | None:
    """Why a row's length-controlled win rate should not be read, if it should not: too few judged comparisons, or
    an LC at 0 or 1 beside a raw win rate away from it (a separated fit: AlpacaEval's GLM has no prior). Shown in
    the LC cell itself, so that it goes wherever the value goes."""
    lc, raw, judged = (row.estimates.get(key) for key in (LC_WIN_RATE.key, WIN_RATE.key, JUDGED.key))
    if lc is None or not math.isfinite(lc.mean):
        return None
    reasons = []
    if judged is not None and judged.mean < LC_MIN_JUDGED:
        reasons.append(f"{judged.mean:g} judged")
    if raw is not None and min(lc.mean, 1 - lc.mean) < LC_SATURATED and min(raw.mean, 1 - raw.mean) >= 5 * LC_SATURATED:
        reasons.append(f"{lc.mean:.2f} beside {raw.mean:.2f} raw")
    return f"unreliable: {', '.join(reasons)}" if reasons else None


def _metric_cell(row: Configuration, metric: Metric) -> str:
    text = _cell(_spread(row, metric.key), metric.spread)
    warning = lc_warning(row) if metric.key == LC_WIN_RATE.key else None
    return text if warning is None else f"{text} ({warning})"


def _notes(verdict: RowVerdict) -> str:
    if verdict.versus_best is None:
        notes = ["best"]
    else:
        notes = ["not distinguishable from best" if verdict.not_distinguishable_from_best else "worse than best"]
    notes += [f"grid edge: {edge}" for edge in verdict.edges]
    return "; ".join(notes)


def _equivalence(verdict: RowVerdict) -> str:
    """``shown (p 0.045)`` where TOST shows the row within the margin of the best, ``not shown (p 0.11)`` otherwise."""
    found = verdict.equivalent_to_best
    if found is None or found.p_value is None:
        return "—"
    return f"{'shown' if found.equivalent else 'not shown'} (p {found.p_value:.2g})"


def _defined(table: LeaderboardTable) -> list[Metric]:
    """The table's metrics that some row has a finite value of: one undefined in the setting (self-BLEU of one
    sample per prompt) is left out rather than shown as a column of n/a."""
    return [
        column
        for column in table.columns
        if any(math.isfinite(found.mean) for row in table.rows if (found := row.estimates.get(column.key)) is not None)
    ]


def _display(table: LeaderboardTable, terminal: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows, most wanted first: method, λ, the rank metric, the paired difference from the baseline and the
    verdict notes, seeds, the other metrics, then the configuration and provenance. A terminal gets neither of the last
    two, nor a seeds column when every row has as many seeds (its title says how many)."""
    metrics = _defined(table)
    rank = [metric for metric in metrics if metric.key == table.rank_metric]
    others = [metric for metric in metrics if metric.key != table.rank_metric]
    versus = [] if table.baseline is None else [f"Δ vs {table.baseline}" + ("" if terminal else " (paired)")]
    margin = table.equivalence_margin
    equivalent = [] if margin is None else [f"within ±{margin:.2g} of best (TOST)"]
    held_out = any(verdict.leave_one_seed_out for verdict in table.verdicts.values())
    picked_apart = [f"{title}, leave-one-seed-out pick" for title in (m.title for m in rank) if held_out]
    seeds = ["seeds"] if not terminal or len(_seed_counts(table)) > 1 else []
    provenance = [] if terminal else ["params", "runs", "git", "recipe"]
    header = [
        "method",
        "λ",
        *(m.title for m in rank),
        *versus,
        "notes",
        *equivalent,
        *picked_apart,
        *seeds,
        *(m.title for m in others),
        *provenance,
    ]
    rows = [
        [
            row.method,
            _lam(row),
            *(_metric_cell(row, metric) for metric in rank),
            *([] if table.baseline is None else [_difference(verdict.versus_baseline, verdict.baseline_p_holm)]),
            _notes(verdict),
            *([_equivalence(verdict)] if equivalent else []),
            *([_cell(verdict.leave_one_seed_out)] if picked_apart else []),
            *([str(len(row.runs))] if seeds else []),
            *(_metric_cell(row, metric) for metric in others),
            *(_provenance(row) if provenance else []),
        ]
        for row in table.rows
        for verdict in [table.verdicts[row.method]]
    ]
    return header, rows


def _provenance(row: Configuration) -> list[str]:
    return [
        _params_text(row.params),
        " ".join(run.run_id[:8] for run in row.runs),
        " ".join(sha[:12] + ("-dirty" if sha.endswith("-dirty") else "") for sha in row.provenance(GIT_SHA)) or "—",
        " ".join(row.provenance(RECIPE_HASH)) or "—",
    ]


def _seed_counts(table: LeaderboardTable) -> set[int]:
    return {len(row.runs) for row in table.rows}


def _title(table: LeaderboardTable) -> str:
    count = len(table.instances)
    scope = "" if not count else f" · instance {table.instances[0]}" if count == 1 else f" · pooled over {count} instances"
    return f"{table.experiment} · {table.dataset}{scope}"


def _terminal_title(table: LeaderboardTable) -> str:
    counts = _seed_counts(table)
    seeds = f" · {next(iter(counts))} seed{'s' if counts != {1} else ''} each" if len(counts) == 1 else ""
    return _title(table) + seeds


def _shown(uri: str) -> str:
    """A store under the working directory as a relative URI: committed tables name no machine's paths."""
    database = sqlite_path(uri)
    if database is None or not database.absolute().is_relative_to(Path.cwd()):
        return uri
    return f"sqlite:///{database.absolute().relative_to(Path.cwd())}"


def _caption(table: LeaderboardTable) -> str:
    direction = "higher" if table.rank_goal == "max" else "lower"
    selected = {verdict.selected_by for verdict in table.verdicts.values()}
    if selected == {table.rank_metric}:
        picked = (
            f"Each method's configuration is picked on `{table.rank_metric}` itself, the reported metric: with a grid, its "
            "value is optimistic"
        )
    else:
        picked = (
            f"Each method's configuration is picked on {', '.join(f'`{key}`' for key in sorted(selected))}, computed on "
            "the evaluation prompts set aside for selection and never reported (whether they are also training prompts "
            "depends on the task: see docs/statistics.md)"
        )
    unit = "seed"
    if len(table.instances) > 1:
        unit = "task instance"
        picked += (
            f"; pooled over {len(table.instances)} task instances: every statistic treats an instance (the mean over its "
            "seeds) as one replication, and pairs instances"
        )
    versus = (
        ""
        if table.baseline is None
        else f"; Δ: the paired per-{unit} difference from `{table.baseline}` (mean ± 95% CI; the paired t-test's p "
        "Holm-adjusted over the column, raw p in the CSV; the exact sign-flip test's p, which at n pairs cannot go below "
        "2/2^n)"
    )
    equivalent = (
        ""
        if table.equivalence_margin is None
        else f' "within ±{table.equivalence_margin:.2g} of best": two one-sided paired t-tests (TOST, 5%) show the row\'s '
        "difference from the best row inside that margin (shown) or fail to (not shown); the margin is a stated fraction "
        "of the best row's gap to the baseline, or the recipe's `statistics.equivalence_margin`."
    )
    return (
        f"Rows ranked by `{table.rank_metric}` ({direction} is better); mean ± 95% CI over {unit}s (Student t), or with one "
        f"seed over the run's prompts (1.96 standard errors){versus}. "
        f'{picked}. "not distinguishable from best": a paired t-test against the best row (Holm-corrected over the rows, '
        f"5%) does not reject equality; that is no evidence the two are equal.{equivalent} "
        f'"grid edge": the picked value is the lowest or highest its grid tried.{_lc_caption(table)} '
        f"Source: {_shown(table.store)}." + _judges_note(table) + _unranked_note(table)
    )


def _unranked_note(table: LeaderboardTable) -> str:
    if not table.unranked:
        return ""
    return f" Not ranked (a non-finite metric in every configuration): {', '.join(table.unranked)}."


def _lc_caption(table: LeaderboardTable) -> str:
    if not any(lc_warning(row) for row in table.rows):
        return ""
    return (
        f' LC "unreliable": fewer than {LC_MIN_JUDGED} judged comparisons, or a length-controlled win rate at 0 or 1 '
        "beside a raw one that is not (the length GLM separated the data): read the raw win rate."
    )


def _judges_note(table: LeaderboardTable) -> str:
    """Which judge each label in the columns is (``j2``, ``truth``), where the runs had several."""
    panels = {judges for row in table.rows for judges in row.provenance(JUDGE) if "=" in judges}
    return f" Judges: {'; '.join(sorted(panels))} (docs/judges.md)." if panels else ""


Cell = Callable[[LeaderboardTable, Configuration], str]


def _number(found: Estimate | None, half_width: bool = False) -> str:
    value = None if found is None else found.half_width if half_width else found.mean
    return "" if value is None else repr(value)


def _number_or_blank(value: float | int | None) -> str:
    return "" if value is None else repr(value)


def _paired(found: PairedDifference | None, field: str) -> str:
    return "" if found is None else _number_or_blank(getattr(found, field))


def _equivalence_field(verdict: RowVerdict, field: str) -> str:
    found = verdict.equivalent_to_best
    return "" if found is None or found.p_value is None else str(getattr(found, field))


def _mean(key: str) -> Cell:
    return lambda table, row: _number(row.estimates.get(key))


def _ci95(key: str) -> Cell:
    return lambda table, row: _number(row.estimates.get(key), half_width=True)


def _csv_columns(tables: Sequence[LeaderboardTable]) -> list[tuple[str, Cell]]:
    """AlpacaEval's leading columns, the other metrics (mean, CI half-width) that any row logged, then provenance.

    ``standard_error`` is AlpacaEval's: the judged win rate's own, over prompts (averaged over seeds); ``*_ci95`` is the
    half-width of the 95% CI over seeds.
    """
    columns: list[tuple[str, Cell]] = [
        ("method", lambda table, row: row.method),
        ("win_rate", _mean(WIN_RATE.key)),
        ("standard_error", _mean(WIN_RATE_STDERR.key)),
        ("lc_win_rate", _mean(LC_WIN_RATE.key)),
        ("n_total", _mean(JUDGED.key)),
        ("avg_length", _mean(MEAN_LENGTH.key)),
        ("win_rate_ci95", _ci95(WIN_RATE.key)),
        ("lc_win_rate_ci95", _ci95(LC_WIN_RATE.key)),
    ]
    logged = {key for table in tables for row in table.rows for key in row.estimates}
    leading = {WIN_RATE.key, LC_WIN_RATE.key, MEAN_LENGTH.key}
    rest = [column.key for column in LEADERBOARD_COLUMNS if column.key not in leading]
    rest += [column.key for column in panel_columns(logged)]
    rest += sorted({table.rank_metric for table in tables} - {column.key for column in LEADERBOARD_COLUMNS})
    for key in rest:
        if key in logged:
            columns += [(key, _mean(key)), (f"{key}_ci95", _ci95(key))]
    return [
        *columns,
        ("selected_by", lambda table, row: table.verdicts[row.method].selected_by),
        ("vs_baseline", lambda table, row: table.baseline or ""),
        ("vs_baseline_difference", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "mean")),
        ("vs_baseline_ci95", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "half_width")),
        ("vs_baseline_p", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "p_value")),
        ("vs_baseline_p_holm", lambda table, row: _number_or_blank(table.verdicts[row.method].baseline_p_holm)),
        ("vs_baseline_sign_flip_p", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "sign_flip_p")),
        ("vs_best_difference", lambda table, row: _paired(table.verdicts[row.method].versus_best, "mean")),
        ("vs_best_p", lambda table, row: _paired(table.verdicts[row.method].versus_best, "p_value")),
        ("vs_best_p_holm", lambda table, row: _number_or_blank(table.verdicts[row.method].best_p_holm)),
        ("vs_best_sign_flip_p", lambda table, row: _paired(table.verdicts[row.method].versus_best, "sign_flip_p")),
        ("not_distinguishable_from_best", lambda table, row: str(table.verdicts[row.method].not_distinguishable_from_best)),
        ("equivalence_margin", lambda table, row: _number_or_blank(table.equivalence_margin)),
        ("equivalence_p", lambda table, row: _equivalence_field(table.verdicts[row.method], "p_value")),
        ("equivalent_to_best", lambda table, row: _equivalence_field(table.verdicts[row.method], "equivalent")),
        ("rank_leave_one_seed_out", lambda table, row: _number(table.verdicts[row.method].leave_one_seed_out)),
        (
            "rank_leave_one_seed_out_ci95",
            lambda table, row: _number(table.verdicts[row.method].leave_one_seed_out, half_width=True),
        ),
        ("grid_edges", lambda table, row: "; ".join(table.verdicts[row.method].edges)),
        ("n_seeds", lambda table, row: str(len(row.runs))),
        ("instances", lambda table, row: " ".join(row.instances)),
        ("rank_metric", lambda table, row: table.rank_metric),
        ("experiment", lambda table, row: table.experiment),
        ("dataset", lambda table, row: table.dataset),
        ("config_key", lambda table, row: row.config_key),
        ("params", lambda table, row: json.dumps(row.params, sort_keys=True)),
        ("run_ids", lambda table, row: " ".join(run.run_id for run in row.runs)),
        ("git_sha", lambda table, row: " ".join(row.provenance(GIT_SHA))),
        ("recipe_hash", lambda table, row: " ".join(row.provenance(RECIPE_HASH))),
    ]


def _write_csv(tables: Sequence[LeaderboardTable], path: Path) -> None:
    columns = _csv_columns(tables)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in columns])
        writer.writerows([cell(table, row) for _, cell in columns] for table in tables for row in table.rows)


DODGE_POINTS = 4.0
BOUNDS = {
    **{key: (0.0, math.inf) for key in (KL.key, "eval/kl_target_to_policy", "eval/kl_target_to_policy_well_formed")},
    "eval/malformed_leak": (0.0, math.inf),
    MEAN_LENGTH.key: (0.0, math.inf),
    **{key: (0.0, 1.0) for key in (WIN_RATE.key, LC_WIN_RATE.key, DISTINCT_2.key)},
}
"""The values a metric can take: an interval drawn around its mean is clipped to them (a KL's t-interval never
reaches below zero, a win rate's never above one)."""


def _bounds(key: str) -> tuple[float, float]:
    """A metric's bounds, also under a temperature's key (``eval/T0.5/win_rate``)."""
    return BOUNDS.get(key) or BOUNDS.get(f"{key.split('/')[0]}/{key.rsplit('/', 1)[-1]}", (-math.inf, math.inf))


def _error_bars(key: str, centres: Sequence[float], half_widths: Sequence[float]) -> list[list[float]]:
    """``[below, above]`` for matplotlib's ``yerr``/``xerr``: each half-width, clipped to the metric's bounds."""
    low, high = _bounds(key)
    below = [max(0.0, min(width, centre - low)) for centre, width in zip(centres, half_widths, strict=True)]
    above = [max(0.0, min(width, high - centre)) for centre, width in zip(centres, half_widths, strict=True)]
    return [below, above]


def _styles(table: LeaderboardTable) -> dict[str, dict[str, Any]]:
    """Each method's colour, marker and line style: fixed by its name, the same in every plot of every experiment."""
    return {configuration.method: method_style(configuration.method) for configuration in table.configurations}


def _axis_label(key: str) -> str:
    """A metric's name for an axis, with its direction: ``KL(π*‖π) (lower is better)``."""
    metric = CATALOG.get(key)
    if metric is None:
        return key
    return metric.title if not metric.directed else f"{metric.title} ({'higher' if metric.goal == 'max' else 'lower'} is better)"


def _dodge(series: ErrorbarContainer, fig: Figure, ax: Axes, index: int, count: int) -> None:
    """Draw series ``index`` of ``count`` a few points left or right of its data, once the axes have fitted the
    data: series on the same values sit side by side instead of on top of one another (the data are unchanged)."""
    shift = transforms.offset_copy(ax.transData, fig=fig, x=(index - (count - 1) / 2) * DODGE_POINTS, units="points")
    for artist in series.get_children():
        artist.set_transform(shift)


def _spans_decades(values: Sequence[float]) -> bool:
    """Positive values a hundredfold apart or more: a linear axis would flatten all but the largest."""
    finite = [value for value in values if math.isfinite(value)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= 100


def _save(fig: Figure, ax: Axes, path: Path, title: str, legend: bool = True) -> Path:
    """Title wrapped to the figure, legend outside the data, nothing clipped (the saved box fits every artist)."""
    ax.set_title(textwrap.fill(title, 55), fontsize="medium")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _half_width(found: Estimate | None) -> float:
    return 0.0 if found is None or found.half_width is None or not math.isfinite(found.half_width) else found.half_width


def _plot_ranking(table: LeaderboardTable, path: Path) -> Path | None:
    found = [(row.method, estimate) for row in table.rows if (estimate := _spread(row, table.rank_metric)) is not None]
    if not found:
        return None
    styles = _styles(table)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(found) + 2), 3.6))
    ax.bar(
        range(len(found)),
        [estimate.mean for _, estimate in found],
        yerr=_error_bars(table.rank_metric, [e.mean for _, e in found], [_half_width(e) for _, e in found]),
        capsize=4,
        color=[styles[method]["color"] for method, _ in found],
    )
    ax.set_xticks(range(len(found)), [method for method, _ in found], rotation=30, ha="right")
    ax.set_ylabel(_axis_label(table.rank_metric))
    if _spans_decades([estimate.mean for _, estimate in found]):
        ax.set_yscale("log")
    return _save(fig, ax, path, f"{_title(table)}: each method's best configuration, mean ± 95% CI", legend=False)


def _plot_lam_sweep(table: LeaderboardTable, path: Path) -> Path | None:
    """The rank metric against λ, every configuration of each method that has a positive ``lam`` param; none where no
    method tried two values of λ (a sweep of one point is no sweep)."""
    curves: dict[str, list[tuple[float, Estimate]]] = defaultdict(list)
    for configuration in table.configurations:
        try:
            lam = float(configuration.params[LAM])
        except (KeyError, ValueError):
            continue
        found = _spread(configuration, table.rank_metric)
        if lam > 0 and found is not None:
            curves[configuration.method].append((lam, found))
    if not any(len({lam for lam, _ in points}) > 1 for points in curves.values()):
        return None
    styles = _styles(table)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for index, (method, points) in enumerate(sorted(curves.items())):
        points.sort(key=lambda point: point[0])
        series = ax.errorbar(
            [lam for lam, _ in points],
            [found.mean for _, found in points],
            yerr=_error_bars(table.rank_metric, [found.mean for _, found in points], [_half_width(found) for _, found in points]),
            capsize=3,
            label=method,
            **styles[method],
        )
        _dodge(series, fig, ax, index, len(curves))
    ax.set_xscale("log")
    if _spans_decades([found.mean for points in curves.values() for _, found in points]):
        ax.set_yscale("log")
    ax.set_xlabel("λ (each method's regularization weight)")
    ax.set_ylabel(_axis_label(table.rank_metric))
    return _save(fig, ax, path, f"{_title(table)}: λ sweep, mean ± 95% CI")


Point = tuple[float, float, float, float]
"""x, y and the half-widths of their 95% intervals over the run's prompts (0 where a metric has no standard error)."""


def _scatter(table: LeaderboardTable, path: Path, points: dict[str, list[Point]], x: str, y: str, title: str) -> Path | None:
    if not points:
        return None
    styles = _styles(table)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for index, (method, found) in enumerate(sorted(points.items())):
        xs, ys, x_errors, y_errors = zip(*found, strict=True)
        style = {**styles[method], "linestyle": "none"}
        x_bars, y_bars = _error_bars(x, xs, x_errors), _error_bars(y, ys, y_errors)
        series = ax.errorbar(xs, ys, xerr=x_bars, yerr=y_bars, capsize=2, markersize=5, alpha=0.85, label=method, **style)
        _dodge(series, fig, ax, index, len(points))
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel(_axis_label(y))
    return _save(fig, ax, path, f"{_title(table)}: {title}")


def _run_point(run: RunRecord, x: str, y: str, stderrs: tuple[str | None, str | None]) -> Point | None:
    if x not in run.metrics or y not in run.metrics:
        return None
    errors = [Z_95 * run.metrics.get(key, 0.0) if key else 0.0 for key in stderrs]
    return run.metrics[x], run.metrics[y], *(error if math.isfinite(error) else 0.0 for error in errors)  # type: ignore[return-value]


def _plot_frontier(table: LeaderboardTable, path: Path) -> Path | None:
    """Reward (or, from a judge without rewards, win rate) against KL(π‖π_ref), one point per run of every
    configuration, with 95% intervals over prompts."""
    rewarded = any(REWARD.key in run.metrics for configuration in table.configurations for run in configuration.runs)
    y = REWARD if rewarded else WIN_RATE
    points: dict[str, list[Point]] = defaultdict(list)
    for configuration in table.configurations:
        for run in configuration.runs:
            if (point := _run_point(run, KL.key, y.key, (KL_STDERR.key, standard_error_key(y.key)))) is not None:
                points[configuration.method].append(point)
    title = f"{y.title}–KL frontier (one point per run, 95% CI over prompts)"
    return _scatter(table, path, points, KL.key, y.key, title)


def _plot_diversity(table: LeaderboardTable, path: Path) -> Path | None:
    """Win rate against diversity (distinct-2 within prompts), one point per run and sampling temperature."""
    points: dict[str, list[Point]] = defaultdict(list)
    for configuration in table.configurations:
        for run in configuration.runs:
            temperatures: list[float | None] = [*_temperatures(list(run.metrics))] or [None]
            for t in temperatures:
                x, y, stderr = (
                    key if t is None else at_temperature(key, t) for key in (DISTINCT_2.key, WIN_RATE.key, WIN_RATE_STDERR.key)
                )
                if (point := _run_point(run, x, y, (None, stderr))) is not None:
                    points[configuration.method].append(point)
    return _scatter(
        table, path, points, DISTINCT_2.key, WIN_RATE.key, "win rate vs diversity (one point per run and temperature)"
    )


def _temperatures(keys: Sequence[str]) -> dict[float, str]:
    """Sampling temperature → its win rate key, for the keys that ``at_temperature`` writes."""
    prefix, name = WIN_RATE.key.split("/", 1)
    pattern = re.compile(re.escape(prefix) + r"/T([^/]+)/" + re.escape(name))
    found = {}
    for key in keys:
        match = pattern.fullmatch(key)
        if match:
            try:
                temperature = float(match.group(1))
            except ValueError:
                continue
            if at_temperature(WIN_RATE.key, temperature) == key:
                found[temperature] = key
    return dict(sorted(found.items()))


def _plot_temperature(table: LeaderboardTable, path: Path) -> Path | None:
    """Win rate against sampling temperature for each method's best configuration; none from a single temperature."""
    curves = {row.method: (row, curve) for row in table.rows if len(curve := _temperatures(list(row.estimates))) >= 2}
    if not curves:
        return None
    styles = _styles(table)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for index, (method, (row, curve)) in enumerate(curves.items()):
        found = [_spread(row, key, at_temperature(WIN_RATE_STDERR.key, t)) for t, key in curve.items()]
        series = ax.errorbar(
            list(curve),
            [estimate.mean for estimate in found if estimate is not None],
            yerr=_error_bars(
                WIN_RATE.key,
                [estimate.mean for estimate in found if estimate is not None],
                [_half_width(estimate) for estimate in found if estimate is not None],
            ),
            capsize=3,
            label=method,
            **styles[method],
        )
        _dodge(series, fig, ax, index, len(curves))
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel(_axis_label(WIN_RATE.key))
    return _save(fig, ax, path, f"{_title(table)}: win rate vs temperature (best configuration, 95% CI)")


PLOTS = {
    "ranking": _plot_ranking,
    "lam_sweep": _plot_lam_sweep,
    "reward_kl": _plot_frontier,
    "temperature": _plot_temperature,
    "diversity": _plot_diversity,
}
"""File suffix → plot; a plot whose metrics no run logged is skipped."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def write_leaderboard(tables: Sequence[LeaderboardTable], out_dir: Path, console: Console) -> list[Path]:
    """Print each table; write ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard-<table>-<plot>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    several = len({table.experiment for table in tables}) > 1
    sections = ["# Leaderboard\n\nGenerated by `expo-bench leaderboard` from the tracking store: do not edit.\n"]
    written = []
    for table in tables:
        header, rows = _display(table, terminal=True)
        # the verdict and the grid edges qualify the rows: kept, with Δ and its tests, wrapped between words if need be
        notes = header.index("notes")
        wrap = [*(index for index, name in enumerate(header) if name.startswith("Δ vs")), notes]
        console.print(rich_table(_terminal_title(table), header, rows, console.width, "leaderboard.md", notes + 1, wrap))
        console.print(_caption(table), style="dim", highlight=False)
        header, rows = _display(table)
        scope = f"-instance-{table.instances[0]}" if len(table.instances) == 1 else ""  # beside the pooled table's
        slug = _slug(f"{table.experiment}-{table.dataset}" if several else table.dataset) + scope
        images = [path for name, plot in PLOTS.items() if (path := plot(table, out_dir / f"leaderboard-{slug}-{name}.png"))]
        figures = "".join(f"\n![{path.stem}]({path.name})\n" for path in images)
        sections.append(f"## {_title(table)}\n\n{_caption(table)}\n\n{markdown_table(header, rows)}{figures}")
        written += images
    markdown = out_dir / "leaderboard.md"
    markdown.write_text("\n".join(sections))
    table_csv = out_dir / "leaderboard.csv"
    _write_csv(tables, table_csv)
    return [markdown, table_csv, *written]
