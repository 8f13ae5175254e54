"""Figures that stay readable: training curves on their own scale, intervals within a metric's bounds, one colour per
method in every experiment, no sweep plot for one λ."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from expo_bench import metric_keys as keys
from expo_bench.leaderboard.plots import _error_bars
from expo_bench.reporting import METHOD_STYLES, method_style
from expo_bench.sweep.lm_report import training_figure


def record(method: str, losses: list[float]) -> SimpleNamespace:
    training = SimpleNamespace(loss_history=list(enumerate(losses)), eval_after={keys.VAL_REWARDS_ACCURACY.key: 0.6})
    return SimpleNamespace(method=method, lam=0.1, training=training)


def test_training_curves_keep_their_own_scale_whatever_the_first_loss() -> None:
    """EXPO's first logged loss was −0.0019: divided by it, the curve reached −37,000 and flattened every panel."""
    expo = [-0.0019 - 0.02 * step for step in range(40)]  # falls to about −0.8
    dpo = [0.6931 - 0.004 * step for step in range(40)]  # falls to about 0.54
    fig = training_figure([record("expo_compositional", expo), record("dpo", dpo)])
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        for method, losses in (("expo_compositional", expo), ("dpo", dpo)):
            low, high = panels[method].get_ylim()
            plotted = panels[method].get_lines()[0].get_ydata()
            assert low <= min(plotted) and max(plotted) <= high  # the losses as logged (smoothed), not ratios
            assert high - low < 2 * (max(losses) - min(losses))  # each panel on its own scale, filled by its curve
            assert min(losses) - 0.1 < min(plotted) and max(plotted) < max(losses) + 0.1
    finally:
        plt.close(fig)


def test_intervals_are_clipped_to_what_the_metric_can_take() -> None:
    below, above = _error_bars(keys.KL.key, [0.009, 2.0], [0.030, 0.5])
    assert below == pytest.approx([0.009, 0.5]) and above == pytest.approx([0.030, 0.5])  # a KL is never below 0
    below, above = _error_bars("eval/T0.5/win_rate", [0.98], [0.05])
    assert below == pytest.approx([0.05]) and above == pytest.approx([0.02])  # a win rate never above 1
    assert _error_bars(keys.REWARD.key, [-1.0], [3.0]) == [[3.0], [3.0]]  # unbounded: symmetric


def test_each_method_has_one_style_in_every_experiment() -> None:
    assert method_style("dpo") == method_style("dpo") and method_style("dpo")["color"] != method_style("ipo")["color"]
    assert len({style[0] for style in METHOD_STYLES.values()}) == len(METHOD_STYLES)  # built-ins never share a colour
    assert method_style("my_method") == method_style("my_method")  # others: by a hash of the label, stable everywhere
