"""The leaderboard's tables: stored runs grouped into configurations, each method's pick, its statistics and
verdicts, one table per dataset and task instance, and the pooled one."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import matplotlib

matplotlib.use("Agg")
from mlflow.entities import Run

from expo_bench.comparison import (
    SIGNIFICANCE,
    Equivalence,
    Estimate,
    PairedDifference,
    equivalence,
    estimate,
    grid_edges,
    holm,
    leave_one_out_pick,
    paired_difference,
)
from expo_bench.comparison_settings import StatisticsConfig
from expo_bench.errors import UserError
from expo_bench.metric_keys import (
    CATALOG,
    KL,
    LEADERBOARD_COLUMNS,
    REWARD,
    Goal,
    Metric,
    judge_of,
    panel_columns,
    selected_metric,
    selection_key,
    standard_error_key,
)
from expo_bench.reporting import Z_95
from expo_bench.tracking import (
    CONFIG_KEY,
    DATASET,
    INSTANCE,
    METHOD,
    RANK_GOAL,
    RANK_METRIC,
    SEED,
    SELECTION_METRIC,
)

LAM = "lam"
"""The run param that the λ-sweep plot puts on its x-axis."""


@dataclass(frozen=True)
class StoredRun:
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]

    @classmethod
    def of(cls, run: Run) -> StoredRun:
        return cls(run.info.run_id, dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))


@dataclass(frozen=True)
class Configuration:
    """The seeds of one method's hyperparameter configuration (tag ``expo_bench.config_key``)."""

    method: str
    config_key: str
    runs: tuple[StoredRun, ...]

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
        known = selected_metric(metric)
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
    unconfirmed: dict[str, PairedDifference | None] = field(default_factory=dict)
    """Ranked by a judge's reward, a gain over the baseline its 95% CI shows that another judge's reward does not
    (reward hacking, or a judge's quirk): that judge's label → its paired difference from the baseline."""

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
    """Methods left out: every configuration's picking or rank metric is non-finite (NaN, ±inf) or missing, or (under a
    KL budget) none is within the budget."""
    kl_budget: float | None = None
    """Only configurations whose mean KL(π‖π_ref) on the selection prompts is at most this competed (None: all)."""


def budget_kl_key(configuration: Configuration) -> str:
    """The KL a budget is checked on: measured on the selection prompts where they were set aside, else the reported
    one (a budget then checked on the reported prompts, which the caption says)."""
    on_selection = selection_key(KL.key)
    return on_selection if on_selection in configuration.estimates else KL.key


def _within(configuration: Configuration, budget: float) -> bool:
    found = configuration.estimates.get(budget_kl_key(configuration))
    return found is not None and found.mean <= budget


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
    runs: Sequence[StoredRun],
    baseline: str | None = "dpo",
    settings: StatisticsConfig | None = None,
    kl_budget: float | None = None,
) -> LeaderboardTable:
    """Each method's picked configuration (only those within ``kl_budget`` compete, when given), ranked, with every
    row's paired comparisons to the baseline and to the best row."""
    groups: dict[tuple[str, str], list[StoredRun]] = defaultdict(list)
    for run in runs:
        groups[run.tags.get(METHOD, run.tags.get("mlflow.runName", run.run_id)), run.tags.get(CONFIG_KEY, run.run_id)].append(run)
    configurations = [Configuration(method, key, tuple(members)) for (method, key), members in sorted(groups.items())]
    by_method: dict[str, list[Configuration]] = defaultdict(list)
    for configuration in configurations:
        by_method[configuration.method].append(configuration)
    eligible = {
        method: [c for c in candidates if kl_budget is None or _within(c, kl_budget)] for method, candidates in by_method.items()
    }
    ranks = {method: Counter(c.rank for c in candidates).most_common(1)[0][0] for method, candidates in by_method.items()}
    picks = {method: _pick(eligible[method], ranks[method]) for method in by_method}
    picked = {method: found for method, found in picks.items() if found is not None}
    if not picked:
        within = "" if kl_budget is None else f" or outside KL ≤ {kl_budget:g}"
        raise NothingToRank(f"{experiment} · {dataset}: every configuration's rank metric is non-finite or missing{within}")
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
            leave_one_seed_out=_leave_one_seed_out(eligible[row.method], rank_metric, rank_goal)
            if settings.leave_one_seed_out
            else None,
            unconfirmed={}
            if baseline_row is None or row is baseline_row
            else _unconfirmed(row, baseline_row, rank_metric, versus_baseline.get(row.method)),
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
        kl_budget,
    )


def _shown_gain(found: PairedDifference | None) -> bool:
    return found is not None and found.half_width is not None and found.mean - found.half_width > 0


def _unconfirmed(
    row: Configuration, baseline: Configuration, rank_metric: str, gain: PairedDifference | None
) -> dict[str, PairedDifference | None]:
    """The other judges (``eval/<label>/reward``) whose reward does not show the gain over the baseline that the rank
    metric, a reward, shows."""
    if rank_metric != REWARD.key or not _shown_gain(gain):
        return {}
    found = {}
    for key in sorted(row.estimates):
        if (label := judge_of(key, REWARD)) is not None:
            other = paired_difference(row.by_unit(key), baseline.by_unit(key))
            if not _shown_gain(other):
                found[label] = other
    return found


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
    store: str, experiment: str, runs: Sequence[StoredRun], baseline: str | None, settings: StatisticsConfig | None = None
) -> list[LeaderboardTable]:
    """One table per dataset; where a dataset's runs span several task instances, one per instance (seeds paired
    within it) before the pooled one (instances paired); each followed by one per KL budget of ``settings``."""
    settings = settings or StatisticsConfig()
    by_dataset: dict[str, list[StoredRun]] = defaultdict(list)
    for run in runs:
        by_dataset[run.tags.get(DATASET, "unknown")].append(run)
    tables: list[LeaderboardTable] = []
    skipped: list[str] = []
    for dataset, members in sorted(by_dataset.items()):
        by_instance: dict[str, list[StoredRun]] = defaultdict(list)
        for run in members:
            by_instance[run.tags.get(INSTANCE, "")].append(run)
        names = sorted(by_instance, key=lambda name: (len(name), name)) if len(by_instance) > 1 else []  # 2 before 10
        for group in [*(by_instance[name] for name in names), members]:  # the pooled table last
            for budget in [None, *settings.kl_budgets]:
                try:
                    tables.append(build_table(store, experiment, dataset, group, baseline, settings, budget))
                except NothingToRank as error:
                    skipped.append(str(error))
    if skipped and not tables:
        raise UserError(f"nothing to rank: {'; '.join(skipped)}")
    return tables


def spread(row: Configuration, key: str, stderr_key: str | None = None) -> Estimate | None:
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


def table_title(table: LeaderboardTable) -> str:
    count = len(table.instances)
    scope = "" if not count else f" · instance {table.instances[0]}" if count == 1 else f" · pooled over {count} instances"
    budget = "" if table.kl_budget is None else f" · KL ≤ {table.kl_budget:g}"
    return f"{table.experiment} · {table.dataset}{scope}{budget}"
