"""Evaluation metrics: a functional core plus a ``torchmetrics.Metric`` per family, exact across DDP ranks.

* :class:`WinRate`: judged win rate with standard error, percentile-bootstrap CI and AlpacaEval's length-controlled
  win rate (Dubois et al. 2024, minimal GLM).
* :class:`Diversity`: distinct-n, normalized n-gram entropy and self-BLEU (Texygen, Zhu et al. 2018) of sampled
  responses, within each prompt's samples and across prompts.
* :class:`RewardKL`: mean reward and the Monte-Carlo sequence-level KL(π‖π_ref).

``compute()`` returns the names after ``eval/`` in :mod:`expo_bench.metric_keys`. The metrics keep per-example
``cat`` states, which torchmetrics gathers in rank order, so a DDP ``compute()`` sees exactly the data one process
would have seen (given each example, or each prompt's samples, to one rank only).

The language-model evaluator runs every metric registered with :func:`sample_metric` on each policy's samples: a new
metric is a registered function here, its keys declared (title, direction) in ``metric_keys``.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from expo_bench import metric_keys

Sample = Sequence[int] | str
"""One sampled response: token ids (unpadded) or text, which is split on whitespace into words."""

_BOOTSTRAP_CHUNK = 1 << 22
"""Resampled indices drawn at once (resamples × n), bounding the bootstrap's memory for large evaluation sets."""


# --- win rate -----------------------------------------------------------------------------------------------


def _judged(outcomes: Tensor) -> Tensor:
    """The parseable verdicts (NaN marks an unparseable one), checked to lie in [0, 1]."""
    outcomes = outcomes.detach().to(device="cpu", dtype=torch.float64).flatten()
    judged = outcomes[~outcomes.isnan()]
    if not ((judged >= 0) & (judged <= 1)).all():
        raise ValueError("outcomes must be 1 (win), 0 (loss), 0.5 (tie), a preference in [0, 1], or NaN (invalid)")
    return judged


def _mean_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof=1, as AlpacaEval's ``sem``); NaN where undefined."""
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if n == 1:
        return mean, math.nan
    return mean, float(values.std(correction=1)) / math.sqrt(n)


def bootstrap_ci(
    values: Tensor, *, clusters: Tensor | None = None, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (NaNs dropped; (NaN, NaN) if none).

    With ``clusters`` (one id per value, e.g. each sample's prompt), whole clusters are resampled and each resample's
    mean is over the values of the clusters drawn: the samples of one prompt are not independent, so resampling them
    one by one would understate the spread. Without, every value is its own cluster. Resamples come from a generator
    seeded with ``seed``, so the interval is deterministic; the percentiles interpolate linearly between resampled
    means (``torch.quantile``, like numpy's default); :func:`resampled_totals` draws the resamples.
    """
    values = values.detach().to(device="cpu", dtype=torch.float64).flatten()
    clusters = torch.arange(values.numel()) if clusters is None else clusters.detach().cpu().flatten()
    if clusters.numel() != values.numel():
        raise ValueError(f"{values.numel()} values but {clusters.numel()} cluster ids")
    defined = ~values.isnan()
    values, clusters = values[defined], clusters[defined]
    if values.numel() == 0:
        return math.nan, math.nan
    _, cluster_of = torch.unique(clusters, return_inverse=True)
    k = int(cluster_of.max()) + 1
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster_of, values)
    counts = torch.bincount(cluster_of, minlength=k).to(torch.float64)
    totals = resampled_totals(torch.stack([sums, counts], dim=1), resamples, seed)
    return _percentiles(totals[:, 0] / totals[:, 1], confidence)


def resampled_totals(per_cluster: Tensor, resamples: int, seed: int) -> Tensor:
    """Bootstrap resamples of clusters: row r is the sum of ``per_cluster``'s rows (one per cluster: sums, counts, ...)
    over a draw of as many clusters with replacement, from a generator seeded with ``seed``."""
    k = per_cluster.shape[0]
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK // k)
    totals = []
    for start in range(0, resamples, chunk):
        drawn = torch.randint(k, (min(chunk, resamples - start), k), generator=generator)
        times = torch.zeros(drawn.shape, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(drawn.shape, dtype=torch.float64))
        totals.append(times @ per_cluster.to(torch.float64))
    return torch.cat(totals)


def _percentiles(statistics: Tensor, confidence: float) -> tuple[float, float]:
    """The equal-tailed percentile interval of resampled statistics (resamples where it is undefined, NaN, left out)."""
    tail = (1 - confidence) / 2
    low, high = torch.nanquantile(statistics, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def _fit_logistic(features: Tensor, targets: Tensor, max_iter: int = 100) -> Tensor:
    """Maximum-likelihood logistic regression with fractional targets in [0, 1], by Newton's method in float64."""
    beta = torch.zeros(features.shape[1], dtype=torch.float64)

    def nll(b: Tensor) -> Tensor:
        z = features @ b
        return (torch.logaddexp(torch.zeros_like(z), z) - targets * z).sum()

    loss = nll(beta)
    for _ in range(max_iter):
        p = torch.sigmoid(features @ beta)
        gradient = features.T @ (p - targets)
        hessian = features.T @ (features * (p * (1 - p))[:, None])
        # Least squares rather than solve: the Hessian is near singular when the data are (almost) separable.
        step = torch.linalg.lstsq(hessian, gradient[:, None]).solution[:, 0]
        # Halve the step until the likelihood does not drop: a full Newton step can overshoot far from the optimum.
        scale = 1.0
        while (candidate := nll(beta - scale * step)) > loss and scale > 1e-10:
            scale /= 2
        beta, loss = beta - scale * step, candidate
        if float((scale * step).abs().max()) < 1e-10:
            break
    return beta


def length_controlled_win_rate(outcomes: Tensor, length_difference: Tensor) -> float:
    """AlpacaEval's length-controlled win rate, in its minimal form (no instruction-difficulty term).

    Fits ``logit P(win) = θ + φ·tanh(Δlen / std(Δlen))`` by maximum likelihood with ties (and any fractional
    preference) as fractional targets, and returns σ(θ): the predicted win rate had candidate and baseline been
    equally long. ``length_difference`` is len(candidate) − len(baseline) per example; examples with a NaN outcome
    are dropped. std has ddof=1, as pandas' in AlpacaEval. Where the length term is undefined (fewer than two
    examples, or one length difference throughout) or the MLE lies at infinity because all verdicts agree, this is
    the raw win rate (the latter is σ(θ)'s limit); under other complete separation the MLE does not exist and this is
    σ(θ) after 100 Newton steps.
    """
    outcomes = outcomes.detach().to(device="cpu", dtype=torch.float64).flatten()
    delta = length_difference.detach().to(device="cpu", dtype=torch.float64).flatten()
    if outcomes.shape != delta.shape:
        raise ValueError(f"{outcomes.numel()} outcomes but {delta.numel()} length differences")
    valid = ~outcomes.isnan()
    targets, delta = _judged(outcomes), delta[valid]
    if targets.numel() == 0:
        return math.nan
    win_rate = float(targets.mean())
    spread = float(delta.std(correction=1)) if delta.numel() > 1 else 0.0
    if win_rate in (0.0, 1.0) or not spread > 0:
        return win_rate
    features = torch.stack([torch.ones_like(delta), torch.tanh(delta / spread)], dim=1)
    return float(torch.sigmoid(_fit_logistic(features, targets)[0]))


def win_rate_summary(
    outcomes: Tensor,
    length_difference: Tensor | None = None,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: Tensor | None = None,
) -> dict[str, float]:
    """Counts, win rate (ties count ½), its standard error and bootstrap CI, and the LC win rate if lengths are given.

    ``outcomes`` per judged example: 1 win, 0 loss, 0.5 tie, NaN unparseable (counted in ``invalid``, excluded from
    ``n`` and everything else). ``stderr`` is AlpacaEval's, over judged examples; the bootstrap CI resamples whole
    ``clusters`` (each example's prompt) when given. See :func:`bootstrap_ci` and :func:`length_controlled_win_rate`.
    """
    judged = _judged(outcomes)
    win_rate, stderr = _mean_stderr(judged)
    ci_low, ci_high = bootstrap_ci(outcomes, clusters=clusters, resamples=resamples, confidence=confidence, seed=seed)
    summary = {
        "wins": float((judged == 1).sum()),
        "losses": float((judged == 0).sum()),
        "ties": float((judged == 0.5).sum()),
        "invalid": float(outcomes.isnan().sum()),
        "n": float(judged.numel()),
        "win_rate": win_rate,
        "stderr": stderr,
        "ci_low": ci_low,
        "ci_high": ci_high,
    }
    if length_difference is not None:
        summary["lc_win_rate"] = length_controlled_win_rate(outcomes, length_difference)
    return summary


# --- diversity ----------------------------------------------------------------------------------------------


def word_ids(text: str) -> list[int]:
    """Whitespace-split words as stable int64 ids (8-byte blake2b), so text samples gather across ranks as tensors."""
    return [
        int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little", signed=True) for word in text.split()
    ]


def _token_ids(sample: Sample) -> list[int]:
    return word_ids(sample) if isinstance(sample, str) else [int(token) for token in sample]


def _ngrams(tokens: Sequence[int], n: int) -> Counter[tuple[int, ...]]:
    return Counter(zip(*(tokens[i:] for i in range(n)), strict=False))


def _pooled(counts: Iterable[Counter[tuple[int, ...]]]) -> Counter[tuple[int, ...]]:
    pooled: Counter[tuple[int, ...]] = Counter()
    for count in counts:
        pooled.update(count)
    return pooled


def _distinct(counts: Counter[tuple[int, ...]]) -> float | None:
    total = counts.total()
    return len(counts) / total if total else None


def _normalized_entropy(counts: Counter[tuple[int, ...]]) -> float | None:
    total = counts.total()
    if total <= 1:  # log(total) = 0: a lone n-gram is trivially all distinct, as its distinct-n of 1 says
        return 1.0 if total else None
    entropy = -math.fsum(c / total * math.log(c / total) for c in counts.values())
    return entropy / math.log(total)


def _mean(values: Iterable[float | None]) -> float:
    """Mean of the defined values (None: no n-grams or no references); NaN if none is defined."""
    defined = [v for v in values if v is not None]
    return math.fsum(defined) / len(defined) if defined else math.nan


def _closest_other_length(length: int, lengths: Counter[int], sorted_lengths: list[int]) -> int:
    """NLTK's closest reference length among the other samples: the nearest, the shorter one on a tie."""
    if lengths[length] > 1:
        return length
    at = bisect.bisect_left(sorted_lengths, length)
    neighbours = sorted_lengths[max(at - 1, 0) : at] + sorted_lengths[at + 1 : at + 2]
    return min(neighbours, key=lambda other: (abs(other - length), other))


def _bleu(length: int, matches: list[int], reference_length: int) -> float:
    """NLTK ``sentence_bleu`` from clipped n-gram matches: uniform weights, Chen & Cherry smoothing method 1 (ε = 0.1)."""
    if matches[0] == 0:  # NLTK returns 0 without a unigram match (this includes an empty hypothesis)
        return 0.0
    log_precisions = []
    for n, matched in enumerate(matches, start=1):
        denominator = max(1, length - n + 1)
        log_precisions.append(math.log((matched if matched else 0.1) / denominator))
    weight = 1 / len(matches)
    brevity = 1.0 if length > reference_length else math.exp(1 - reference_length / length)
    return brevity * math.exp(math.fsum(weight * log_p for log_p in log_precisions))


def _self_bleu(samples: Sequence[Sequence[int]], max_order: int) -> list[float]:
    """Each sample's BLEU against all the other samples as references (Texygen self-BLEU); empty if fewer than two.

    Clipping needs, per n-gram, the highest count among the *other* samples: from the highest count overall, how many
    samples reach it, and the runner-up, that is O(total n-grams) instead of O(samples²).
    """
    if len(samples) < 2:
        return []
    matches = [[0] * max_order for _ in samples]
    for n in range(1, max_order + 1):
        counts = [_ngrams(sample, n) for sample in samples]
        top: dict[tuple[int, ...], list[int]] = {}  # n-gram -> [highest count, samples with it, runner-up count]
        for count in counts:
            for gram, k in count.items():
                entry = top.get(gram)
                if entry is None:
                    top[gram] = [k, 1, 0]
                elif k > entry[0]:
                    top[gram] = [k, 1, entry[0]]
                elif k == entry[0]:
                    entry[1] += 1
                elif k > entry[2]:
                    entry[2] = k
        for i, count in enumerate(counts):
            clipped = 0
            for gram, k in count.items():
                highest, reaching, runner_up = top[gram]
                clipped += min(k, highest if k < highest or reaching > 1 else runner_up)
            matches[i][n - 1] = clipped
    lengths = Counter(len(sample) for sample in samples)
    sorted_lengths = sorted(lengths)
    return [
        _bleu(len(sample), matched, _closest_other_length(len(sample), lengths, sorted_lengths))
        for sample, matched in zip(samples, matches, strict=True)
    ]


def diversity(samples: Sequence[Sequence[Sample]], ngrams: Sequence[int] = (1, 2), max_order: int = 4) -> dict[str, float]:
    """Diversity of responses grouped by prompt (``samples[p]``: prompt p's samples), for each n in ``ngrams``.

    * ``distinct_{n}_per_sample``: mean over samples of unique / total n-grams within the sample (repetition
      inside one response);
    * ``distinct_{n}_within_prompt``: per prompt, unique n-grams pooled over its samples / their total n-grams,
      averaged over prompts (how different a prompt's samples are); ``distinct_{n}_across_prompts``: the same
      pooled over all samples;
    * ``entropy_{n}_within_prompt`` / ``entropy_{n}_across_prompts``: Shannon entropy of the pooled n-gram
      frequencies divided by its maximum, log(total n-grams), so 1 means every n-gram distinct and 0 one n-gram
      repeated (comparable across lengths, unlike raw entropy); a single n-gram counts as 1;
    * ``self_bleu_within_prompt``: mean BLEU of each sample against its prompt's other samples;
      ``self_bleu_across_prompts``: against all other samples; BLEU as Texygen's self-BLEU, i.e. NLTK
      ``sentence_bleu`` with uniform weights up to ``max_order`` and ``SmoothingFunction().method1``;
    * ``mean_length``: tokens per sample.

    A sample shorter than n has no n-grams; a sample or prompt without n-grams (or a sample without other samples
    to compare with) is left out of the mean rather than scored 0 or 1, and a mean over nothing is NaN.
    """
    groups = [[_token_ids(sample) for sample in group] for group in samples]
    flat = [sample for group in groups for sample in group]
    summary: dict[str, float] = {}
    for n in ngrams:
        sample_counts = [[_ngrams(sample, n) for sample in group] for group in groups]
        prompt_counts = [_pooled(group) for group in sample_counts]
        pooled = _pooled(prompt_counts)
        summary[f"distinct_{n}_per_sample"] = _mean(_distinct(counts) for group in sample_counts for counts in group)
        summary[f"distinct_{n}_within_prompt"] = _mean(_distinct(counts) for counts in prompt_counts)
        summary[f"distinct_{n}_across_prompts"] = _mean([_distinct(pooled)])
        summary[f"entropy_{n}_within_prompt"] = _mean(_normalized_entropy(counts) for counts in prompt_counts)
        summary[f"entropy_{n}_across_prompts"] = _mean([_normalized_entropy(pooled)])
    summary["self_bleu_within_prompt"] = _mean(bleu for group in groups for bleu in _self_bleu(group, max_order))
    summary["self_bleu_across_prompts"] = _mean(_self_bleu(flat, max_order))
    summary["mean_length"] = _mean(len(sample) for sample in flat)
    return summary


# --- reward and KL ------------------------------------------------------------------------------------------


def reward_kl_summary(rewards: Tensor, policy_logps: Tensor, reference_logps: Tensor) -> dict[str, float]:
    """Mean reward and the Monte-Carlo KL(π‖π_ref) = E_{y~π}[log π(y) − log π_ref(y)], each with its standard error.

    One entry per sample drawn from π: its reward and its sequence log-probabilities under π and π_ref.
    """
    rewards, policy_logps, reference_logps = (
        t.detach().to(device="cpu", dtype=torch.float64).flatten() for t in (rewards, policy_logps, reference_logps)
    )
    _check_per_sample(rewards, policy_logps, reference_logps)
    return _reward_kl(rewards, policy_logps - reference_logps)


def kl_summary(policy_logps: Tensor, reference_logps: Tensor) -> dict[str, float]:
    """The Monte-Carlo KL(π‖π_ref) of samples from π and its standard error: it needs no reward, so every judge has it."""
    log_ratios = policy_logps.detach().double().cpu().flatten() - reference_logps.detach().double().cpu().flatten()
    kl, kl_stderr = _mean_stderr(log_ratios)
    return {"kl": kl, "kl_stderr": kl_stderr}


def _check_per_sample(rewards: Tensor, policy_logps: Tensor, reference_logps: Tensor) -> None:
    if not rewards.numel() == policy_logps.numel() == reference_logps.numel():
        raise ValueError(
            f"one reward and two log-probs per sample, got {rewards.numel()}, {policy_logps.numel()}, {reference_logps.numel()}"
        )


def _reward_kl(rewards: Tensor, log_ratios: Tensor) -> dict[str, float]:
    reward, reward_stderr = _mean_stderr(rewards)
    kl, kl_stderr = _mean_stderr(log_ratios)
    return {"reward": reward, "reward_stderr": reward_stderr, "kl": kl, "kl_stderr": kl_stderr, "n": float(rewards.numel())}


# --- the judges' audit ---------------------------------------------------------------------------------------


def _mean_with_intervals(
    name: str, values: Tensor, clusters: Tensor | None, resamples: int, confidence: float, seed: int
) -> dict[str, float]:
    mean, stderr = _mean_stderr(values)
    low, high = bootstrap_ci(values, clusters=clusters, resamples=resamples, confidence=confidence, seed=seed)
    return {name: mean, f"{name}_stderr": stderr, f"{name}_ci_low": low, f"{name}_ci_high": high}


def position_bias_summary(
    first: Tensor,
    second: Tensor,
    *,
    clusters: Tensor | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """A judge's position bias and self-consistency on comparisons it judged in both orders.

    ``first`` and ``second``: per comparison, the candidate's outcome when shown first and when shown second (1 win,
    0 loss; a pair with a NaN, an unparseable answer, is left out). ``first_position_wins`` is the share of the 2n
    answers that picked the response shown first, i.e. the mean over pairs of (first + 1 − second) / 2: ½ is no
    bias. ``self_consistency`` is the share of pairs whose two answers pick the same response (first = second).
    Each comes with its standard error over pairs and a percentile-bootstrap CI resampling ``clusters`` (each
    pair's prompt); ``swapped`` counts the pairs.
    """
    first, second = (t.detach().to(device="cpu", dtype=torch.float64).flatten() for t in (first, second))
    if clusters is not None:
        clusters = clusters.detach().cpu().flatten()
    both = ~(first.isnan() | second.isnan())
    first, second = _judged(first[both]), _judged(second[both])
    clusters = None if clusters is None else clusters[both]
    summary = {"swapped": float(first.numel())}
    for name, values in (("first_position_wins", (first + 1 - second) / 2), ("self_consistency", (first == second).double())):
        summary |= _mean_with_intervals(name, values, clusters, resamples, confidence, seed)
    return summary


def cohen_kappa(confusion: Tensor) -> Tensor:
    """Cohen's κ of confusion matrices ``(..., C, C)`` of counts: (p_o − p_e) / (1 − p_e); NaN where p_e = 1."""
    n = confusion.sum(dim=(-2, -1))
    observed = confusion.diagonal(dim1=-2, dim2=-1).sum(dim=-1) / n
    expected = (confusion.sum(dim=-1) * confusion.sum(dim=-2)).sum(dim=-1) / n**2
    return (observed - expected) / (1 - expected)


def agreement_summary(
    a: Tensor,
    b: Tensor,
    *,
    clusters: Tensor | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """How two judges agree on the same comparisons: ``a[i]`` and ``b[i]`` are their outcomes (1 win, 0 loss, ½ tie;
    comparisons either left invalid, NaN, are dropped).

    ``agreement``: the share of comparisons with the same outcome, with its standard error and bootstrap CI; ``kappa``:
    Cohen's κ over the outcomes as categories (scikit-learn's ``cohen_kappa_score``), chance-corrected: 0 is the
    agreement of two judges that vote independently at their own rates, 1 perfect; with its bootstrap standard
    error (the resampled κs' standard deviation) and percentile CI. Resamples draw whole ``clusters`` (each
    comparison's prompt) and share one draw for both statistics; ``n`` counts the comparisons.
    """
    a, b = (t.detach().to(device="cpu", dtype=torch.float64).flatten() for t in (a, b))
    if a.numel() != b.numel():
        raise ValueError(f"{a.numel()} outcomes of one judge but {b.numel()} of the other")
    clusters = torch.arange(a.numel()) if clusters is None else clusters.detach().cpu().flatten()
    both = ~(a.isnan() | b.isnan())
    a, b, clusters = _judged(a[both]), _judged(b[both]), clusters[both]
    summary = {"n": float(a.numel())}
    summary |= _mean_with_intervals("agreement", (a == b).double(), clusters, resamples, confidence, seed)
    if a.numel() == 0:
        return summary | {"kappa": math.nan, "kappa_stderr": math.nan, "kappa_ci_low": math.nan, "kappa_ci_high": math.nan}
    categories = torch.unique(torch.cat([a, b]))
    c = categories.numel()
    cell = torch.searchsorted(categories, a) * c + torch.searchsorted(categories, b)
    _, cluster_of = torch.unique(clusters, return_inverse=True)
    per_cluster = torch.zeros(int(cluster_of.max()) + 1, c * c, dtype=torch.float64)
    per_cluster.index_put_((cluster_of, cell), torch.ones_like(a), accumulate=True)
    kappa = float(cohen_kappa(per_cluster.sum(dim=0).view(c, c)))
    resampled = cohen_kappa(resampled_totals(per_cluster, resamples, seed).view(-1, c, c))
    defined = resampled[~resampled.isnan()]
    low, high = _percentiles(resampled, confidence) if defined.numel() else (math.nan, math.nan)
    stderr = float(defined.std(correction=1)) if defined.numel() > 1 else math.nan
    return summary | {"kappa": kappa, "kappa_stderr": stderr, "kappa_ci_low": low, "kappa_ci_high": high}


# --- torchmetrics -------------------------------------------------------------------------------------------


class _CatMetric(Metric):
    """A metric whose states are all per-example ``cat`` lists of the dtypes in ``_states``."""

    _states: ClassVar[dict[str, torch.dtype]]
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._states:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        # torchmetrics stands in for a rank's empty state with a tensor of ``self.dtype`` (float32), which other
        # ranks' int64/float64 tensors cannot be gathered with; send an empty tensor of the state's own dtype.
        for name, dtype in self._states.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.empty(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def _append(self, name: str, values: Tensor) -> None:
        getattr(self, name).append(values.detach().to(device=self.device, dtype=self._states[name]).flatten())

    def _gathered(self, name: str) -> Tensor:
        """A state as one CPU tensor, whether still this rank's list or already gathered into a tensor."""
        state = getattr(self, name)
        if isinstance(state, list) and not state:
            return torch.empty(0, dtype=self._states[name])
        return dim_zero_cat(state).cpu()

    def _as_tensors(self, summary: dict[str, float]) -> dict[str, Tensor]:
        return {name: torch.tensor(value, dtype=torch.float64, device=self.device) for name, value in summary.items()}


class WinRate(_CatMetric):
    """Win rate of judged comparisons against a baseline: see :func:`win_rate_summary` for the keys."""

    _states: ClassVar[dict[str, torch.dtype]] = {
        "outcomes": torch.float64,
        "length_difference": torch.float64,
        "clusters": torch.int64,
    }
    higher_is_better = True

    def __init__(self, resamples: int = 1000, confidence: float = 0.95, seed: int = 0, **kwargs: Any) -> None:
        if resamples < 1 or not 0 < confidence < 1:
            raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
        super().__init__(**kwargs)
        self.resamples, self.confidence, self.seed = resamples, confidence, seed

    def update(self, outcomes: Tensor, length_difference: Tensor | None = None, clusters: Tensor | None = None) -> None:
        """Add verdicts (1 win, 0 loss, 0.5 tie, NaN invalid), for the LC win rate len(candidate) − len(baseline), and
        for a clustered bootstrap each verdict's cluster id (its prompt)."""
        _judged(outcomes)
        for name, given in (("length_difference", length_difference), ("clusters", clusters)):
            if self.outcomes and (given is None) == bool(getattr(self, name)):
                raise ValueError(f"pass {name} with every update or with none")
            if given is not None:
                if given.numel() != outcomes.numel():
                    raise ValueError(f"{outcomes.numel()} outcomes but {given.numel()} values of {name}")
                self._append(name, given)
        self._append("outcomes", outcomes)

    def compute(self) -> dict[str, Tensor]:
        outcomes, length_difference = self._gathered("outcomes"), self._gathered("length_difference")
        clusters = self._gathered("clusters")
        summary = win_rate_summary(
            outcomes,
            length_difference if length_difference.numel() else None,
            resamples=self.resamples,
            confidence=self.confidence,
            seed=self.seed,
            clusters=clusters if clusters.numel() else None,
        )
        return self._as_tensors(summary)


class Diversity(_CatMetric):
    """Diversity of sampled responses grouped by prompt: see :func:`diversity` for the definitions and keys.

    States are the flattened token ids, each sample's length and each prompt's number of samples; gathered in rank
    order they rebuild every prompt's group, provided each prompt's samples go to one ``update`` call.
    """

    _states: ClassVar[dict[str, torch.dtype]] = {"tokens": torch.int64, "lengths": torch.int64, "group_sizes": torch.int64}

    def __init__(self, ngrams: Sequence[int] = (1, 2), max_order: int = 4, **kwargs: Any) -> None:
        if min(ngrams, default=0) < 1 or max_order < 1:
            raise ValueError(f"n-gram orders must be positive, got ngrams={ngrams}, max_order={max_order}")
        super().__init__(**kwargs)
        self.ngrams, self.max_order = tuple(ngrams), max_order

    def update(self, samples: Sequence[Sequence[Sample]]) -> None:
        """Add prompts' samples: ``samples[p]`` is prompt p's responses, each token ids or text."""
        groups = [[_token_ids(sample) for sample in group] for group in samples]
        flat = [sample for group in groups for sample in group]
        self._append("tokens", torch.tensor([token for sample in flat for token in sample], dtype=torch.int64))
        self._append("lengths", torch.tensor([len(sample) for sample in flat], dtype=torch.int64))
        self._append("group_sizes", torch.tensor([len(group) for group in groups], dtype=torch.int64))

    def compute(self) -> dict[str, Tensor]:
        tokens = self._gathered("tokens").tolist()
        lengths = self._gathered("lengths").tolist()
        flat = [tokens[end - length : end] for end, length in zip(accumulate(lengths), lengths, strict=True)]
        groups, start = [], 0
        for size in self._gathered("group_sizes").tolist():
            groups.append(flat[start : start + size])
            start += size
        return self._as_tensors(diversity(groups, self.ngrams, self.max_order))


class RewardKL(_CatMetric):
    """Mean reward and sequence-level KL(π‖π_ref) of samples from π: see :func:`reward_kl_summary` for the keys."""

    _states: ClassVar[dict[str, torch.dtype]] = {"rewards": torch.float64, "log_ratios": torch.float64}

    def update(self, rewards: Tensor, policy_logps: Tensor, reference_logps: Tensor) -> None:
        """Add samples' rewards and their sequence log-probabilities under the sampling policy and the reference."""
        _check_per_sample(rewards, policy_logps, reference_logps)
        self._append("rewards", rewards)
        self._append("log_ratios", policy_logps.detach().double() - reference_logps.detach().double())

    def compute(self) -> dict[str, Tensor]:
        return self._as_tensors(_reward_kl(self._gathered("rewards"), self._gathered("log_ratios")))


# --- the evaluator's registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluatedSamples:
    """One policy's evaluation at one temperature, everything a sample metric may read: one entry per sample (prompt
    after prompt) unless said otherwise."""

    samples: Sequence[Sequence[Sequence[int]]]
    """Per prompt, its samples' token ids without EOS."""
    outcomes: Tensor
    """The first judge's verdict on each sample against its baseline (1 win, 0 loss, ½ tie, NaN invalid)."""
    length_difference: Tensor
    """len(sample) − len(baseline), in tokens."""
    clusters: Tensor
    """Each sample's prompt: a bootstrap resamples a prompt's samples together."""
    rewards: Tensor | None
    """The first rewarding judge's reward of each sample (None: no judge gives rewards)."""
    policy_logps: Tensor
    """log π(y | x) of each sample under the distribution it was drawn from."""
    reference_logps: Tensor
    resamples: int
    """Bootstrap resamples for confidence intervals."""


SampleMetric = Callable[[EvaluatedSamples], Mapping[str, Tensor | float]]


@dataclass(frozen=True)
class RegisteredMetric:
    compute: SampleMetric
    outputs: tuple[metric_keys.Metric, ...]
    """The headline metrics it reports (declared in :mod:`expo_bench.metric_keys`, with their titles and goals);
    it may report their standard errors and intervals beside them."""


SAMPLE_METRICS: dict[str, RegisteredMetric] = {}
"""What the language-model evaluator computes on every policy's samples, in registration order (a later metric's
key overrides an earlier one's)."""


def sample_metric(name: str, *outputs: metric_keys.Metric) -> Callable[[SampleMetric], SampleMetric]:
    """Register ``compute(evaluated) -> {name after eval/: value}`` under ``name`` for the evaluator to run on every
    policy's samples; ``outputs`` are the declared metrics it reports."""

    def register(compute: SampleMetric) -> SampleMetric:
        if name in SAMPLE_METRICS:
            raise ValueError(f"sample metric {name!r} is registered twice")
        unknown = [metric.key for metric in outputs if metric_keys.CATALOG.get(metric.key) != metric]
        if unknown or not outputs:
            raise ValueError(f"sample metric {name!r}: declare its outputs in expo_bench.metric_keys (not {unknown})")
        SAMPLE_METRICS[name] = RegisteredMetric(compute, outputs)
        return compute

    return register


@sample_metric("reward_kl", metric_keys.REWARD, metric_keys.KL)
def _reward_and_kl(evaluated: EvaluatedSamples) -> Mapping[str, Tensor | float]:
    if evaluated.rewards is None:
        return kl_summary(evaluated.policy_logps, evaluated.reference_logps)
    metric = RewardKL(sync_on_compute=False)  # every rank holds every sample here: no gathering
    metric.update(evaluated.rewards, evaluated.policy_logps, evaluated.reference_logps)
    return metric.compute()


@sample_metric("win_rate", metric_keys.WIN_RATE, metric_keys.LC_WIN_RATE, metric_keys.JUDGED, metric_keys.INVALID_VERDICTS)
def _win_rate(evaluated: EvaluatedSamples) -> Mapping[str, Tensor | float]:
    metric = WinRate(resamples=evaluated.resamples, sync_on_compute=False)
    metric.update(evaluated.outcomes, evaluated.length_difference, clusters=evaluated.clusters)
    return metric.compute()


@sample_metric("diversity", metric_keys.DISTINCT_2, metric_keys.SELF_BLEU, metric_keys.ENTROPY_2, metric_keys.MEAN_LENGTH)
def _diversity(evaluated: EvaluatedSamples) -> Mapping[str, Tensor | float]:
    metric = Diversity(sync_on_compute=False)
    metric.update(evaluated.samples)
    return metric.compute()
