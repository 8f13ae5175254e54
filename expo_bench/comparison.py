"""The statistics a leaderboard's verdict rests on: a mean's Student-t interval, paired differences between methods
(t-test and exact sign-flip test), Holm's correction over a column of comparisons, equivalence tests (TOST) for "as good
as" verdicts, leave-one-seed-out selection, and whether a configuration picked from a grid sits on its edge.
docs/statistics.md says which test backs which sentence of a leaderboard."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
MAX_EXACT_SIGN_FLIPS = 16
"""Up to this many pairs the sign-flip test enumerates all 2^n sign patterns (65,536); beyond, it is not computed."""


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
class PairedDifference:
    """method − other on the units (seeds, or task instances) both have: the mean difference, its 95% Student-t CI
    half-width and the paired t-test's two-sided p-value (None where n < 2 or every difference is the same), and the
    exact two-sided sign-flip (paired permutation) p-value, which assumes no normality (None beyond
    :data:`MAX_EXACT_SIGN_FLIPS` pairs; at n pairs it cannot go below 2/2^n: 0.0625 at n = 5)."""

    mean: float
    half_width: float | None
    p_value: float | None
    n: int
    sign_flip_p: float | None = None


def _pairs(method: Mapping[str, float], other: Mapping[str, float]) -> tuple[list[float], list[float]]:
    units = sorted(set(method) & set(other))
    return [method[unit] for unit in units], [other[unit] for unit in units]


def paired_difference(method: Mapping[str, float], other: Mapping[str, float]) -> PairedDifference | None:
    """Pair two methods' values of one metric by seed (``{seed: value}``); None when they share no seed.

    Seeds pair the same data, SFT weights and evaluation draws, so the seed-to-seed spread they share cancels: a
    paired test sees differences an unpaired comparison of two CIs misses.
    """
    ours, theirs = _pairs(method, other)
    if not ours:
        return None
    differences = [a - b for a, b in zip(ours, theirs, strict=True)]
    mean, n = statistics.fmean(differences), len(differences)
    flips = sign_flip_p(differences)
    if n < 2 or len(set(differences)) == 1:
        return PairedDifference(mean, None if n < 2 else 0.0, None, n, flips)
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return PairedDifference(mean, half_width, float(stats.ttest_rel(ours, theirs).pvalue), n, flips)


def sign_flip_p(differences: Sequence[float]) -> float | None:
    """The exact two-sided paired permutation test of a zero mean difference: under the null each difference is as
    likely negated, so p is the share of the 2^n sign patterns whose |sum| reaches the observed one's (ties within
    rounding count as reaching it). None beyond :data:`MAX_EXACT_SIGN_FLIPS` differences."""
    n = len(differences)
    if not n or n > MAX_EXACT_SIGN_FLIPS:
        return None
    values = np.asarray(differences, dtype=np.float64)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    sums = np.abs(signs @ values)
    observed = abs(float(values.sum()))
    tolerance = 1e-12 * max(1.0, float(np.abs(values).sum()))
    return float(np.mean(sums >= observed - tolerance))


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided paired t-tests (TOST) of |mean(method − other)| < ``margin``: ``p_value`` is the larger of the two
    one-sided p-values (None where n < 2 or every difference is the same). Below :data:`SIGNIFICANCE` the two are shown
    equivalent within the margin; above, equivalence is not shown (which is not a difference either)."""

    margin: float
    mean: float
    p_value: float | None
    n: int

    @property
    def equivalent(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE


def equivalence(method: Mapping[str, float], other: Mapping[str, float], margin: float) -> Equivalence | None:
    """TOST of method and other, paired by unit (``{unit: value}``), at ±``margin``; None when they share no unit."""
    ours, theirs = _pairs(method, other)
    if not ours:
        return None
    differences = [a - b for a, b in zip(ours, theirs, strict=True)]
    mean, n = statistics.fmean(differences), len(differences)
    if n < 2 or len(set(differences)) == 1:
        return Equivalence(margin, mean, None, n)
    above_lower = stats.ttest_1samp(differences, -margin, alternative="greater").pvalue
    below_upper = stats.ttest_1samp(differences, margin, alternative="less").pvalue
    return Equivalence(margin, mean, float(max(above_lower, below_upper)), n)


def leave_one_out_pick(
    selection: Mapping[str, Mapping[str, float]], reported: Mapping[str, Mapping[str, float]], goal: Literal["min", "max"]
) -> dict[str, float]:
    """Selection without in-sample bias: for each unit (seed), the reported value of the configuration whose selection
    metric, averaged over the *other* units, is best. ``selection`` and ``reported`` map configuration → {unit: value};
    ties go to the configuration named first. A unit no configuration can be picked for is left out."""
    picked = {}
    for unit in sorted({unit for values in reported.values() for unit in values}):
        scores = {
            name: statistics.fmean(others) * (1 if goal == "min" else -1)
            for name in sorted(selection)
            if unit in reported.get(name, {}) and (others := [value for held, value in selection[name].items() if held != unit])
        }
        if scores:
            picked[unit] = reported[min(scores, key=lambda name: scores[name])][unit]
    return picked


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
