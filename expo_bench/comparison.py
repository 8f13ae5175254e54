"""The statistics a leaderboard's verdict rests on: per-seed paired differences between methods, Holm's correction
for comparing several methods with the best, and whether a configuration picked from a grid sits on its edge."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class PairedDifference:
    """method − other on the seeds both ran: the mean difference, its 95% Student-t CI half-width and the paired
    t-test's two-sided p-value (None where n < 2 or every difference is the same), over ``n`` seeds."""

    mean: float
    half_width: float | None
    p_value: float | None
    n: int


def paired_difference(method: Mapping[str, float], other: Mapping[str, float]) -> PairedDifference | None:
    """Pair two methods' values of one metric by seed (``{seed: value}``); None when they share no seed.

    Seeds pair the same data, SFT weights and evaluation draws, so the seed-to-seed spread they share cancels: a
    paired test sees differences an unpaired comparison of two CIs misses.
    """
    seeds = sorted(set(method) & set(other))
    if not seeds:
        return None
    ours, theirs = [method[seed] for seed in seeds], [other[seed] for seed in seeds]
    differences = [a - b for a, b in zip(ours, theirs, strict=True)]
    mean, n = statistics.fmean(differences), len(differences)
    if n < 2 or len(set(differences)) == 1:
        return PairedDifference(mean, None if n < 2 else 0.0, None, n)
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return PairedDifference(mean, half_width, float(stats.ttest_rel(ours, theirs).pvalue), n)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values: the k-th smallest of m is multiplied by m − k + 1, made monotone, capped at 1."""
    adjusted: dict[str, float] = {}
    running = 0.0
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    for k, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - k) * p))
        adjusted[name] = running
    return adjusted


def grid_edges(selected: Mapping[str, str], grid: Sequence[Mapping[str, str]]) -> list[str]:
    """The hyperparameters whose selected value is the lowest or highest of the values the grid tried (a grid that
    varies them over at least two numbers): the optimum may lie beyond the grid. ``selected`` and each grid point map
    parameter names to their recorded values."""
    edges = []
    for name, value in sorted(selected.items()):
        tried = {number for point in grid if name in point and (number := _number(point[name])) is not None}
        chosen = _number(value)
        if len(tried) < 2 or chosen is None:
            continue
        if chosen in (min(tried), max(tried)):
            edges.append(f"{name}={value} is the {'lowest' if chosen == min(tried) else 'highest'} of {len(tried)} tried")
    return edges


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
