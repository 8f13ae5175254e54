"""The leaderboard's verdict: paired statistics checked against scipy, Holm's correction, grid edges, and the rule
that picks each method's configuration on prompts set aside for it, never on the reported metric."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from expo_bench import metric_keys as keys
from expo_bench import tracking
from expo_bench.comparison import (
    equivalence,
    grid_edges,
    holm,
    leave_one_out_pick,
    paired_difference,
    sign_flip_p,
)
from expo_bench.comparison_settings import StatisticsConfig
from expo_bench.leaderboard import StoredRun, build_table, experiment_tables, write_leaderboard

RANK, SELECTION = keys.KL_TO_TARGET.key, keys.selection_key(keys.KL_TO_TARGET.key)


def test_paired_difference_matches_scipy() -> None:
    method = {"0": 1.0, "1": 2.5, "2": 2.0, "3": 4.0, "9": 100.0}
    baseline = {"0": 2.0, "1": 2.0, "2": 3.5, "3": 5.0, "7": -100.0}
    found = paired_difference(method, baseline)
    assert found is not None and found.n == 4  # only the seeds both ran are paired
    ours, theirs = [1.0, 2.5, 2.0, 4.0], [2.0, 2.0, 3.5, 5.0]
    differences = [a - b for a, b in zip(ours, theirs, strict=True)]
    interval = stats.t.interval(0.95, 3, loc=sum(differences) / 4, scale=stats.sem(differences))
    assert found.mean == pytest.approx(-0.75)
    assert found.half_width == pytest.approx((interval[1] - interval[0]) / 2)
    assert found.p_value == pytest.approx(stats.ttest_rel(ours, theirs).pvalue)


# The tuned comparison's per-seed KL(π*‖π) differences, EXPO-compositional − DPO (README, issue 21)
EXPO_MINUS_DPO = [-0.87, -0.35, 0.09, -0.74, -0.67]


def permutation_reference(differences: list[float]) -> float:
    """scipy's exact paired permutation test of the mean difference (every sign pattern)."""
    zeros = [0.0] * len(differences)
    return float(
        stats.permutation_test(
            (differences, zeros),
            lambda x, y: np.mean(x - y),
            permutation_type="samples",
            n_resamples=np.inf,
            alternative="two-sided",
        ).pvalue
    )


@pytest.mark.parametrize(
    "differences",
    [EXPO_MINUS_DPO, [0.3, -0.1, 0.25, 0.4], [1.0, 2.0, -0.5, 0.7, 1.1, 0.9, -0.2, 1.3], [0.5, -0.5], [0.0, 0.0, 1.0]],
)
def test_sign_flip_p_matches_scipy_permutation_test(differences: list[float]) -> None:
    assert sign_flip_p(differences) == pytest.approx(permutation_reference(differences))


def test_sign_flip_p_floor_and_the_tuned_comparison() -> None:
    assert sign_flip_p([-1.0, -2.0, -0.5, -3.0, -1.5]) == pytest.approx(2 / 32)  # every difference negative: the floor
    assert sign_flip_p(EXPO_MINUS_DPO) == pytest.approx(4 / 32)  # the t-test's 0.042 is not reached without normality
    assert sign_flip_p([0.1] * 17) is None  # beyond exact enumeration
    found = paired_difference({str(i): d for i, d in enumerate(EXPO_MINUS_DPO)}, dict.fromkeys(map(str, range(5)), 0.0))
    assert found is not None and found.sign_flip_p == pytest.approx(0.125)
    assert found.p_value == pytest.approx(stats.ttest_1samp(EXPO_MINUS_DPO, 0.0).pvalue)


@pytest.mark.parametrize("margin", [0.1, 0.255, 0.6])
def test_equivalence_matches_statsmodels_ttost_paired(margin: float) -> None:
    ours, theirs = [0.52, 0.71, 0.40, 0.66, 0.58], [0.61, 0.49, 0.55, 0.70, 0.35]
    found = equivalence({str(i): v for i, v in enumerate(ours)}, {str(i): v for i, v in enumerate(theirs)}, margin)
    reference, _, _ = ttost_paired(np.array(ours), np.array(theirs), -margin, margin)
    assert found is not None and found.n == 5 and found.p_value == pytest.approx(float(reference))
    assert found.equivalent == (float(reference) < 0.05)


def test_equivalence_is_not_a_failure_to_reject() -> None:
    """Differences scattered around 0 are not distinguishable from 0, and still not shown equivalent at a tight margin;
    at a wide margin they are."""
    differences = [0.4, -0.35, 0.3, -0.45, 0.2]
    ours = {str(i): d for i, d in enumerate(differences)}
    zero = dict.fromkeys(ours, 0.0)
    versus = paired_difference(ours, zero)
    assert versus is not None and versus.p_value is not None and versus.p_value > 0.05
    tight, wide = equivalence(ours, zero, 0.1), equivalence(ours, zero, 2.0)
    assert tight is not None and not tight.equivalent and wide is not None and wide.equivalent
    assert equivalence({"0": 1.0}, {"1": 1.0}, 0.5) is None
    single = equivalence({"0": 1.0}, {"0": 1.2}, 0.5)
    assert single is not None and single.p_value is None and not single.equivalent


def test_leave_one_out_pick_selects_on_the_other_seeds() -> None:
    # "a" is best on seeds 0 and 1's selection prompts, "b" on seed 2's by so much that it wins the in-sample average
    selection = {"a": {"0": 1.0, "1": 1.0, "2": 9.0}, "b": {"0": 2.0, "1": 2.0, "2": 0.0}}
    reported = {"a": {"0": 10.0, "1": 11.0, "2": 12.0}, "b": {"0": 20.0, "1": 21.0, "2": 22.0}}
    # seed 0: others (1, 2) give a 5.0, b 1.0 → b; seed 1: likewise b; seed 2: others (0, 1) give a 1.0, b 2.0 → a
    assert leave_one_out_pick(selection, reported, "min") == {"0": 20.0, "1": 21.0, "2": 12.0}
    assert leave_one_out_pick(selection, reported, "max") == {"0": 10.0, "1": 11.0, "2": 22.0}
    assert leave_one_out_pick({"a": {"0": 1.0}}, {"a": {"0": 5.0}}, "min") == {}  # no other seed to pick on


def test_paired_difference_without_enough_seeds() -> None:
    assert paired_difference({"0": 1.0}, {"1": 2.0}) is None
    single = paired_difference({"0": 1.0}, {"0": 3.0})
    assert single is not None and (single.mean, single.half_width, single.p_value, single.n) == (-2.0, None, None, 1)
    constant = paired_difference({"0": 1.0, "1": 2.0}, {"0": 0.0, "1": 1.0})
    assert constant is not None and constant.half_width == 0.0 and constant.p_value is None


def test_holm_step_down() -> None:
    # sorted 0.01, 0.03, 0.04: times 3, 2, 1 = 0.03, 0.06, 0.04, then made monotone: 0.03, 0.06, 0.06
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize(
    "p_values",
    [[0.042, 0.0031, 0.00054, 0.064, 0.084, 0.029, 0.0012], [0.5, 0.01, 0.01, 0.2], [0.9], [0.001, 0.04, 0.03, 0.045]],
)
def test_holm_matches_statsmodels(p_values: list[float]) -> None:
    names = [f"m{i}" for i in range(len(p_values))]
    reference = multipletests(p_values, method="holm")[1]
    assert holm(dict(zip(names, p_values, strict=True))) == pytest.approx(dict(zip(names, reference, strict=True)))


def test_grid_edges() -> None:
    grid = [{"params.beta": b, "train.optimizer.lr": lr} for b in ("0.1", "1.0", "3.0") for lr in ("0.001", "0.01")]
    assert grid_edges({"params.beta": "1.0", "train.optimizer.lr": "0.01"}, grid) == [
        "train.optimizer.lr=0.01 is the highest of 2 tried"
    ]
    assert grid_edges({"params.beta": "0.1", "params.kl_estimator": "x"}, grid) == ["params.beta=0.1 is the lowest of 3 tried"]
    assert grid_edges({"params.beta": "1.0"}, [{"params.beta": "1.0"}]) == []  # one value is no grid


def run(method: str, beta: str, seed: int, reported: float, selected: float | None, instance: str | None = None) -> StoredRun:
    metrics = {RANK: reported} | ({} if selected is None else {SELECTION: selected})
    tags = {
        tracking.METHOD: method,
        tracking.CONFIG_KEY: f"{method}-{beta}",
        tracking.SEED: str(seed),
        tracking.RANK_METRIC: RANK,
        tracking.RANK_GOAL: "min",
    } | ({} if selected is None else {tracking.SELECTION_METRIC: SELECTION})
    tags |= {} if instance is None else {tracking.INSTANCE: instance}
    return StoredRun(f"{method}{beta}{seed}{instance}", metrics, {"params.beta": beta}, tags)


def runs(with_selection: bool) -> list[StoredRun]:
    """expo: β=1 is better on the selection prompts, β=3 on the reported ones (what selection must not see). dpo: far
    worse on every seed. ipo: as good as expo's pick up to noise that does not follow the seeds."""
    found = []
    for seed in range(5):
        noise = 0.05 * (seed - 2)
        found += [
            run("expo", "1.0", seed, 1.0 + noise, 0.5 if with_selection else None),
            run("expo", "3.0", seed, 0.8 + noise, 0.9 if with_selection else None),
            run("dpo", "0.1", seed, 5.0 + seed, 5.0 if with_selection else None),
            run("ipo", "0.5", seed, 1.0 + (0.1 if seed % 2 else -0.1), 1.0 if with_selection else None),
        ]
    return found


def test_configurations_are_picked_on_the_selection_prompts() -> None:
    table = build_table("store", "exp", "data", runs(with_selection=True), baseline="dpo")
    expo = next(row for row in table.rows if row.method == "expo")
    assert expo.params["params.beta"] == "1.0"  # best on the selection prompts, though worse on the reported ones
    assert table.verdicts["expo"].selected_by == SELECTION
    assert table.verdicts["expo"].edges == ["params.beta=1.0 is the lowest of 2 tried"]
    versus = table.verdicts["expo"].versus_baseline
    assert versus is not None and versus.mean == pytest.approx(
        statistics_mean([1.0 + 0.05 * (s - 2) - (5.0 + s) for s in range(5)])
    )
    assert table.verdicts["dpo"].versus_baseline is None and table.baseline == "dpo"
    assert [row.method for row in table.rows] == ["ipo", "expo", "dpo"]  # ipo's mean 0.98 edges out expo's 1.0
    assert table.verdicts["expo"].not_distinguishable_from_best and not table.verdicts["dpo"].not_distinguishable_from_best


def test_without_selection_prompts_the_pick_is_on_the_reported_metric() -> None:
    table = build_table("store", "exp", "data", runs(with_selection=False), baseline="dpo")
    expo = next(row for row in table.rows if row.method == "expo")
    assert expo.params["params.beta"] == "3.0" and table.verdicts["expo"].selected_by == RANK
    assert table.verdicts["expo"].edges == ["params.beta=3.0 is the highest of 2 tried"]


def statistics_mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def test_table_statistics_match_their_references() -> None:
    """The Δ-vs-baseline column's p-values are Holm-adjusted over the column (statsmodels), the raw ones kept; each row is
    tested for equivalence with the best at half the best row's gap to the baseline (statsmodels' paired TOST)."""
    table = build_table("store", "exp", "data", runs(with_selection=True), baseline="dpo")
    reported = {
        method: [r.metrics[RANK] for r in runs(True) if r.tags[tracking.METHOD] == method and r.params["params.beta"] == beta]
        for method, beta in (("expo", "1.0"), ("ipo", "0.5"), ("dpo", "0.1"))
    }
    raw = {method: table.verdicts[method].versus_baseline for method in ("expo", "ipo")}
    for method, found in raw.items():
        assert found is not None and found.p_value == pytest.approx(stats.ttest_rel(reported[method], reported["dpo"]).pvalue)
    holm_reference = multipletests([raw["expo"].p_value, raw["ipo"].p_value], method="holm")[1]  # type: ignore[union-attr]
    assert [table.verdicts[method].baseline_p_holm for method in ("expo", "ipo")] == pytest.approx(list(holm_reference))
    best_gap = statistics_mean([a - b for a, b in zip(reported["ipo"], reported["dpo"], strict=True)])
    assert table.rows[0].method == "ipo" and table.equivalence_margin == pytest.approx(0.5 * abs(best_gap))
    found = table.verdicts["expo"].equivalent_to_best
    margin = 0.5 * abs(best_gap)
    reference = ttost_paired(np.array(reported["expo"]), np.array(reported["ipo"]), -margin, margin)[0]
    assert found is not None and found.p_value == pytest.approx(float(reference)) and found.equivalent
    assert table.verdicts["ipo"].equivalent_to_best is None  # the best row itself
    fixed = build_table("store", "exp", "data", runs(True), "dpo", StatisticsConfig(equivalence_margin=0.01))
    assert fixed.equivalence_margin == 0.01 and not fixed.verdicts["expo"].equivalent_to_best.equivalent  # type: ignore[union-attr]
    assert build_table("store", "exp", "data", runs(True), baseline=None).equivalence_margin is None


def test_leave_one_seed_out_row() -> None:
    """expo's β=1 wins the selection prompts on every seed, so picking on the other seeds picks it for every seed
    (leave_one_out_pick's own test has a seed whose pick changes)."""
    table = build_table("store", "exp", "data", runs(True), "dpo", StatisticsConfig(leave_one_seed_out=True))
    found = table.verdicts["expo"].leave_one_seed_out
    assert found is not None and found.mean == pytest.approx(1.0) and found.n == 5
    assert build_table("store", "exp", "data", runs(True), "dpo").verdicts["expo"].leave_one_seed_out is None


def instance_runs() -> list[StoredRun]:
    """Three task instances × three seeds; expo beats dpo by an instance-specific amount plus seed noise."""
    gains = {"0": 1.0, "1": 0.2, "2": 0.6}
    found = []
    for instance, gain in gains.items():
        for seed in range(3):
            noise = 0.1 * (seed - 1) * (1 if instance == "1" else -1)
            found += [
                run("expo", "1.0", seed, 2.0 - gain + noise, None, instance),
                run("dpo", "0.1", seed, 2.0 + 0.05 * seed, None, instance),
            ]
    return found


def test_instances_are_the_replication_unit_of_the_pooled_table() -> None:
    tables = experiment_tables("store", "exp", instance_runs(), "dpo")
    assert [table.instances for table in tables] == [("0",), ("1",), ("2",), ("0", "1", "2")]
    pooled = tables[-1]
    expo, dpo = (next(row for row in pooled.rows if row.method == method) for method in ("expo", "dpo"))
    by_instance = {
        method: [
            statistics_mean(
                [r.metrics[RANK] for r in instance_runs() if r.tags[tracking.METHOD] == method and r.tags[tracking.INSTANCE] == i]
            )
            for i in "012"
        ]
        for method in ("expo", "dpo")
    }
    assert list(expo.by_unit(RANK).values()) == pytest.approx(by_instance["expo"])
    versus = pooled.verdicts["expo"].versus_baseline
    assert versus is not None and versus.n == 3  # three instances, not nine seeds
    assert versus.p_value == pytest.approx(stats.ttest_rel(by_instance["expo"], by_instance["dpo"]).pvalue)
    estimate = expo.estimates[RANK]
    assert estimate.n == 3 and estimate.half_width == pytest.approx(
        float(stats.t.ppf(0.975, 2)) * float(np.std(by_instance["expo"], ddof=1)) / math.sqrt(3)
    )
    first = tables[0].verdicts["expo"].versus_baseline  # within an instance: seeds pair
    assert first is not None and first.n == 3 and set(tables[0].rows[0].by_unit(RANK)) == {"0", "1", "2"}
    assert dpo.by_unit(RANK).keys() == {"0", "1", "2"}
    untagged = experiment_tables("store", "exp", runs(True), "dpo")
    assert len(untagged) == 1 and untagged[0].instances == ()


def test_each_instance_table_keeps_its_own_plots(tmp_path: Path) -> None:
    """The per-instance tables' plots sit beside the pooled table's, each section of leaderboard.md showing its own."""
    written = write_leaderboard(experiment_tables("store", "exp", instance_runs(), "dpo"), tmp_path, Console(quiet=True))
    rankings = sorted(path.name for path in written if path.name.endswith("-ranking.png"))
    assert rankings == sorted(
        f"leaderboard-unknown{scope}-ranking.png" for scope in ("", "-instance-0", "-instance-1", "-instance-2")
    )
    sections = (tmp_path / "leaderboard.md").read_text().split("\n## ")[1:]
    for section, scope in zip(sections, ("-instance-0", "-instance-1", "-instance-2", ""), strict=True):
        assert f"(leaderboard-unknown{scope}-ranking.png)" in section and section.count("-ranking.png") == 1
