"""The leaderboard's plots: the rank metric per method, λ sweeps, the reward–KL frontier, win rate against diversity
and temperature, each with its intervals."""

from __future__ import annotations

import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import transforms
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from expo_bench.comparison import (
    Estimate,
)
from expo_bench.leaderboard.table import LAM, LeaderboardTable, StoredRun, spread, table_title
from expo_bench.metric_keys import (
    CATALOG,
    DISTINCT_2,
    KL,
    KL_STDERR,
    LC_WIN_RATE,
    MEAN_LENGTH,
    REWARD,
    WIN_RATE,
    WIN_RATE_STDERR,
    at_temperature,
    standard_error_key,
)
from expo_bench.reporting import Z_95, method_style

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
    found = [(row.method, estimate) for row in table.rows if (estimate := spread(row, table.rank_metric)) is not None]
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
    return _save(fig, ax, path, f"{table_title(table)}: each method's best configuration, mean ± 95% CI", legend=False)


def _plot_lam_sweep(table: LeaderboardTable, path: Path) -> Path | None:
    """The rank metric against λ, every configuration of each method that has a positive ``lam`` param; none where no
    method tried two values of λ (a sweep of one point is no sweep)."""
    curves: dict[str, list[tuple[float, Estimate]]] = defaultdict(list)
    for configuration in table.configurations:
        try:
            lam = float(configuration.params[LAM])
        except (KeyError, ValueError):
            continue
        found = spread(configuration, table.rank_metric)
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
    return _save(fig, ax, path, f"{table_title(table)}: λ sweep, mean ± 95% CI")


Point = tuple[float, float, float, float]
"""x, y and the half-widths of their 95% intervals over the run's prompts (0 where a metric has no standard error)."""


def _scatter(table: LeaderboardTable, path: Path, points: dict[str, list[Point]], x: str, y: str, title: str) -> Path | None:
    if not points:
        return None
    styles = _styles(table)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, found in sorted(points.items()):  # measured on both axes: drawn where measured, never dodged
        xs, ys, x_errors, y_errors = zip(*found, strict=True)
        style = {**styles[method], "linestyle": "none"}
        x_bars, y_bars = _error_bars(x, xs, x_errors), _error_bars(y, ys, y_errors)
        ax.errorbar(xs, ys, xerr=x_bars, yerr=y_bars, capsize=2, markersize=5, alpha=0.85, label=method, **style)
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel(_axis_label(y))
    return _save(fig, ax, path, f"{table_title(table)}: {title}")


def _run_point(run: StoredRun, x: str, y: str, stderrs: tuple[str | None, str | None]) -> Point | None:
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
        found = [spread(row, key, at_temperature(WIN_RATE_STDERR.key, t)) for t, key in curve.items()]
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
    return _save(fig, ax, path, f"{table_title(table)}: win rate vs temperature (best configuration, 95% CI)")


PLOTS = {
    "ranking": _plot_ranking,
    "lam_sweep": _plot_lam_sweep,
    "reward_kl": _plot_frontier,
    "temperature": _plot_temperature,
    "diversity": _plot_diversity,
}
"""File suffix → plot; a plot whose metrics no run logged is skipped."""
