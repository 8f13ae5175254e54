"""The leaderboard's verdict: paired statistics checked against scipy, Holm's correction, grid edges, and the rule
that picks each method's configuration on prompts set aside for it, never on the reported metric."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from expo_bench import metric_keys as keys
from expo_bench import tracking
from expo_bench.comparison import grid_edges, holm, paired_difference
from expo_bench.leaderboard import RunRecord, build_table

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


def test_grid_edges() -> None:
    grid = [{"params.beta": b, "train.optimizer.lr": lr} for b in ("0.1", "1.0", "3.0") for lr in ("0.001", "0.01")]
    assert grid_edges({"params.beta": "1.0", "train.optimizer.lr": "0.01"}, grid) == [
        "train.optimizer.lr=0.01 is the highest of 2 tried"
    ]
    assert grid_edges({"params.beta": "0.1", "params.kl_estimator": "x"}, grid) == ["params.beta=0.1 is the lowest of 3 tried"]
    assert grid_edges({"params.beta": "1.0"}, [{"params.beta": "1.0"}]) == []  # one value is no grid


def run(method: str, beta: str, seed: int, reported: float, selected: float | None) -> RunRecord:
    metrics = {RANK: reported} | ({} if selected is None else {SELECTION: selected})
    tags = {
        tracking.METHOD: method,
        tracking.CONFIG_KEY: f"{method}-{beta}",
        tracking.SEED: str(seed),
        tracking.RANK_METRIC: RANK,
        tracking.RANK_GOAL: "min",
    } | ({} if selected is None else {tracking.SELECTION_METRIC: SELECTION})
    return RunRecord(f"{method}{beta}{seed}", metrics, {"params.beta": beta}, tags)


def runs(with_selection: bool) -> list[RunRecord]:
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
    assert table.verdicts["expo"].indistinguishable_from_best and not table.verdicts["dpo"].indistinguishable_from_best


def test_without_selection_prompts_the_pick_is_on_the_reported_metric() -> None:
    table = build_table("store", "exp", "data", runs(with_selection=False), baseline="dpo")
    expo = next(row for row in table.rows if row.method == "expo")
    assert expo.params["params.beta"] == "3.0" and table.verdicts["expo"].selected_by == RANK
    assert table.verdicts["expo"].edges == ["params.beta=3.0 is the highest of 2 tried"]


def statistics_mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)
