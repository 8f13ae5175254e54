"""Evaluation metrics against independent implementations (NLTK, scipy, scikit-learn, naive sets) and across DDP ranks."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA, missing
from network import free_port

from expo_bench import metric_keys
from expo_bench.evaluation.metrics import (
    Diversity,
    RewardKL,
    WinRate,
    agreement_summary,
    bootstrap_ci,
    diversity,
    kl_summary,
    length_controlled_win_rate,
    position_bias_summary,
    reward_kl_summary,
    win_rate_summary,
    word_ids,
)

DATA = SHARED_DATA
IMDB_TEST_SAMPLE = DATA / "imdb" / "test_sample.jsonl.gz"
NAN = math.nan


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    """The first 40 IMDb test-sample reviews, HTML line breaks removed, cut to 80 words to keep NLTK quick."""
    if not IMDB_TEST_SAMPLE.is_file():
        pytest.skip(missing(IMDB_TEST_SAMPLE))
    with gzip.open(IMDB_TEST_SAMPLE, "rt", encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for _, line in zip(range(40), lines, strict=False)]
    return [" ".join(text.replace("<br />", " ").split()[:80]) for text in texts]


@pytest.fixture(scope="module")
def prompts(reviews: list[str]) -> list[list[str]]:
    """Reviews grouped as 10 prompts of 4 sampled responses each."""
    return [reviews[i : i + 4] for i in range(0, len(reviews), 4)]


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal keys and bit-identical values, NaN equal to NaN."""
    fa, fb = ({k: float(v) for k, v in d.items()} for d in (a, b))
    return fa.keys() == fb.keys() and all(fa[k] == fb[k] or (math.isnan(fa[k]) and math.isnan(fb[k])) for k in fa)


def floats(summary: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items()}


# --- win rate -----------------------------------------------------------------------------------------------


def test_win_rate_counts_and_stderr_by_hand() -> None:
    outcomes = torch.tensor([1, 1, 0, 0.5, NAN, 1, 0, 0.5])
    # By hand: 7 parseable verdicts summing to 4 → 4/7; Σx² = 3.5, so the sample variance is (3.5 − 7·(4/7)²)/6 = 8.5/42.
    expected = {"wins": 3, "losses": 2, "ties": 2, "invalid": 1, "n": 7, "win_rate": 4 / 7, "stderr": math.sqrt(8.5 / 42 / 7)}
    summary = win_rate_summary(outcomes)
    assert set(summary) == {*expected, "ci_low", "ci_high"}
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key
    assert 0 <= summary["ci_low"] < 4 / 7 < summary["ci_high"] <= 1
    metric = WinRate()
    metric.update(outcomes)
    assert same(metric.compute(), summary)


def test_compute_keys_follow_the_metric_keys_contract() -> None:
    metric = WinRate()
    metric.update(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([3.0, -1.0, 2.0]))
    keys = set(metric.compute())
    contract = {
        metric_keys.WIN_RATE.key,
        metric_keys.WIN_RATE_STDERR.key,
        metric_keys.WIN_RATE_CI_LOW.key,
        metric_keys.WIN_RATE_CI_HIGH.key,
    }
    contract |= {metric_keys.LC_WIN_RATE.key, metric_keys.JUDGED.key, metric_keys.INVALID_VERDICTS.key}
    assert {key.removeprefix("eval/") for key in contract} <= keys
    rewards = RewardKL()
    rewards.update(torch.ones(2), torch.zeros(2), torch.zeros(2))
    assert {metric_keys.REWARD.key.removeprefix("eval/"), metric_keys.KL.key.removeprefix("eval/")} <= set(rewards.compute())
    spread = Diversity()
    spread.update([["a b c", "a b d"]])
    contract = {metric_keys.DISTINCT_2.key, metric_keys.SELF_BLEU.key, metric_keys.ENTROPY_2.key, metric_keys.MEAN_LENGTH.key}
    assert {key.removeprefix("eval/") for key in contract} <= set(spread.compute())


def test_win_rate_degenerate_inputs() -> None:
    empty = win_rate_summary(torch.tensor([NAN, NAN]))
    assert empty["n"] == 0 and empty["invalid"] == 2
    assert all(math.isnan(empty[key]) for key in ("win_rate", "stderr", "ci_low", "ci_high"))
    single = win_rate_summary(torch.tensor([1.0]))
    assert single["win_rate"] == single["ci_low"] == single["ci_high"] == 1 and math.isnan(single["stderr"])
    with pytest.raises(ValueError, match="outcomes must be"):
        win_rate_summary(torch.tensor([1.0, 2.0]))
    metric = WinRate()
    metric.update(torch.tensor([1.0]), torch.tensor([4.0]))
    with pytest.raises(ValueError, match="every update or with none"):
        metric.update(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="values of length_difference"):
        metric.update(torch.tensor([0.0, 1.0]), torch.tensor([1.0]))


def random_outcomes(n: int, seed: int, tie_rate: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    outcomes = (torch.rand(n, generator=generator, dtype=torch.float64) < 0.62).double()
    outcomes[torch.rand(n, generator=generator) < tie_rate] = 0.5
    return outcomes


def test_bootstrap_ci_is_deterministic_and_near_the_normal_ci_for_large_n() -> None:
    outcomes = random_outcomes(4000, seed=1)
    summary = win_rate_summary(outcomes)
    again = win_rate_summary(outcomes)
    assert (summary["ci_low"], summary["ci_high"]) == (again["ci_low"], again["ci_high"])
    assert bootstrap_ci(outcomes, seed=1) != bootstrap_ci(outcomes, seed=0)
    mean, stderr = summary["win_rate"], summary["stderr"]
    # The mean of 4000 bounded verdicts is close to normal; 1000 resamples place the 2.5% quantile within ~0.1 stderr.
    assert summary["ci_low"] == pytest.approx(mean - 1.96 * stderr, abs=0.25 * stderr)
    assert summary["ci_high"] == pytest.approx(mean + 1.96 * stderr, abs=0.25 * stderr)
    narrow = bootstrap_ci(outcomes, confidence=0.5)
    assert summary["ci_low"] < narrow[0] < mean < narrow[1] < summary["ci_high"]


def length_biased_judgments(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Verdicts of a judge that favours longer answers, for a candidate that is longer on average."""
    generator = torch.Generator().manual_seed(seed)
    delta = (torch.randn(n, generator=generator, dtype=torch.float64) * 80 + 30).round()
    p_win = torch.sigmoid(0.2 + 1.5 * torch.tanh(delta / delta.std()))
    outcomes = (torch.rand(n, generator=generator, dtype=torch.float64) < p_win).double()
    outcomes[torch.rand(n, generator=generator) < 0.15] = 0.5
    return outcomes, delta


def test_lc_win_rate_matches_scikit_learn_logistic_regression() -> None:
    np = pytest.importorskip("numpy")
    linear_model = pytest.importorskip("sklearn.linear_model")
    outcomes, delta = length_biased_judgments(600, seed=3)
    outcomes[:5] = NAN  # unparseable verdicts are left out of the fit
    valid = ~outcomes.isnan()
    y, d = outcomes[valid].numpy(), delta[valid].numpy()
    x = np.tanh(d / d.std(ddof=1))[:, None]
    # A fractional label y is a win with weight y plus a loss with weight 1 − y.
    features, labels, weights = np.concatenate([x, x]), np.r_[np.ones_like(y), np.zeros_like(y)], np.r_[y, 1 - y]
    fit = linear_model.LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    fit.fit(features, labels, sample_weight=weights)
    expected = 1 / (1 + math.exp(-fit.intercept_[0]))
    lc = length_controlled_win_rate(outcomes, delta)
    assert lc == pytest.approx(expected, abs=1e-8)
    raw = win_rate_summary(outcomes)["win_rate"]
    assert lc < raw - 0.03, (lc, raw)  # the length bias inflated the raw win rate
    assert win_rate_summary(outcomes, delta)["lc_win_rate"] == lc


def test_lc_win_rate_equals_the_raw_win_rate_when_length_does_not_matter() -> None:
    outcomes = random_outcomes(300, seed=4)
    delta = torch.randn(300, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 50
    # Symmetric design: every verdict also occurs at the opposite length difference, so φ̂ = 0 and σ(θ̂) = mean.
    outcomes, delta = torch.cat([outcomes, outcomes]), torch.cat([delta, -delta])
    assert length_controlled_win_rate(outcomes, delta) == pytest.approx(float(outcomes.mean()), abs=1e-12)
    # Conventions where the length term is undefined or the MLE lies at infinity: the raw win rate.
    assert length_controlled_win_rate(outcomes, torch.full_like(delta, 7.0)) == float(outcomes.mean())
    assert length_controlled_win_rate(torch.ones(10), torch.arange(10.0)) == 1
    assert math.isnan(length_controlled_win_rate(torch.tensor([NAN]), torch.tensor([1.0])))


# --- diversity ----------------------------------------------------------------------------------------------


def naive_ngrams(words: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def naive_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else NAN


def naive_distinct(groups: list[list[list[str]]], n: int) -> dict[str, float]:
    """The distinct-n definitions written out with sets and lists."""
    per_sample = [len(set(g)) / len(g) for group in groups for sample in group if (g := naive_ngrams(sample, n))]
    within = [len(set(g)) / len(g) for group in groups if (g := [x for sample in group for x in naive_ngrams(sample, n)])]
    everything = [x for group in groups for sample in group for x in naive_ngrams(sample, n)]
    return {
        f"distinct_{n}_per_sample": naive_mean(per_sample),
        f"distinct_{n}_within_prompt": naive_mean(within),
        f"distinct_{n}_across_prompts": len(set(everything)) / len(everything),
    }


def scipy_entropy(groups: list[list[list[str]]], n: int) -> dict[str, float]:
    stats = pytest.importorskip("scipy.stats")

    def normalized(grams: list[tuple[str, ...]]) -> float:
        if len(grams) == 1:  # the documented convention: a lone n-gram is all distinct
            return 1.0
        return float(stats.entropy(list(Counter(grams).values()))) / math.log(len(grams))

    within = [normalized(g) for group in groups if (g := [x for sample in group for x in naive_ngrams(sample, n)])]
    everything = [x for group in groups for sample in group for x in naive_ngrams(sample, n)]
    return {f"entropy_{n}_within_prompt": naive_mean(within), f"entropy_{n}_across_prompts": normalized(everything)}


def nltk_self_bleu(groups: list[list[list[str]]]) -> dict[str, float]:
    """Texygen's self-BLEU with NLTK: each sample against the others, within its prompt and across all prompts."""
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    smoothing = bleu.SmoothingFunction().method1

    def self_bleu(samples: list[list[str]]) -> list[float]:
        return [
            bleu.sentence_bleu(samples[:i] + samples[i + 1 :], sample, weights=(0.25,) * 4, smoothing_function=smoothing)
            for i, sample in enumerate(samples)
        ]

    flat = [sample for group in groups for sample in group]
    within = [score for group in groups if len(group) > 1 for score in self_bleu(group)]
    return {"self_bleu_within_prompt": naive_mean(within), "self_bleu_across_prompts": naive_mean(self_bleu(flat))}


def check_against_references(groups: list[list[list[str]]], summary: dict[str, float]) -> None:
    expected = nltk_self_bleu(groups)
    for n in (1, 2):
        expected |= naive_distinct(groups, n) | scipy_entropy(groups, n)
    expected["mean_length"] = naive_mean([len(sample) for group in groups for sample in group])
    assert set(summary) == set(expected)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-9), key


def test_diversity_on_imdb_reviews_matches_nltk_scipy_and_naive_sets(prompts: list[list[str]]) -> None:
    metric = Diversity()
    metric.update(prompts)
    summary = floats(metric.compute())
    check_against_references([[text.split() for text in group] for group in prompts], summary)
    assert 0 < summary["self_bleu_within_prompt"] < 0.5 and summary["distinct_2_within_prompt"] > 0.8  # distinct reviews


def test_diversity_on_repetitive_token_ids_matches_the_references() -> None:
    """A five-token vocabulary gives many clipped matches, ties of reference lengths and repeated n-grams."""
    rng = random.Random(0)
    groups = [[[rng.randrange(5) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(1, 5))] for _ in range(12)]
    check_against_references([[[str(t) for t in sample] for sample in group] for group in groups], diversity(groups))


def test_collapsed_samples_have_self_bleu_one_and_a_quarter_of_the_distinct_ngrams(reviews: list[str]) -> None:
    copies = diversity([[reviews[0]] * 4])
    alone = diversity([[reviews[0]]])
    assert copies["self_bleu_within_prompt"] == pytest.approx(1.0, abs=1e-12)
    for n in (1, 2):
        assert copies[f"distinct_{n}_within_prompt"] == pytest.approx(alone[f"distinct_{n}_per_sample"] / 4)
        assert copies[f"distinct_{n}_per_sample"] == alone[f"distinct_{n}_per_sample"]
    assert math.isnan(alone["self_bleu_within_prompt"])  # no other sample to compare with


def test_text_samples_equal_their_word_ids_and_any_other_word_numbering(prompts: list[list[str]]) -> None:
    vocabulary: dict[str, int] = {}
    numbered = [[[vocabulary.setdefault(word, len(vocabulary)) for word in text.split()] for text in group] for group in prompts]
    hashed = [[word_ids(text) for text in group] for group in prompts]
    assert same(diversity(prompts), diversity(numbered)) and same(diversity(prompts), diversity(hashed))
    assert word_ids("the cat  the") == [word_ids("the")[0], word_ids("cat")[0], word_ids("the")[0]]


def test_diversity_conventions_for_short_and_empty_samples() -> None:
    summary = diversity([[[1], [2, 2], []], [], [[3]]], ngrams=(1, 2, 3))
    assert summary["distinct_1_per_sample"] == pytest.approx((1 + 0.5 + 1) / 3)  # the empty sample is left out
    assert summary["distinct_2_per_sample"] == 1 and summary["distinct_2_within_prompt"] == 1  # only [2, 2] has a bigram
    assert summary["entropy_2_within_prompt"] == 1  # a lone bigram counts as all distinct
    assert math.isnan(summary["distinct_3_per_sample"]) and math.isnan(summary["entropy_3_across_prompts"])
    assert summary["mean_length"] == pytest.approx(4 / 4)
    # Unigrams {1: 1, 2: 2} in the first prompt, none in the second (left out), one in the third (entropy 1).
    assert summary["entropy_1_within_prompt"] == pytest.approx(((math.log(3) - 2 / 3 * math.log(2)) / math.log(3) + 1) / 2)
    assert math.isnan(diversity([])["mean_length"]) and math.isnan(diversity([[[1, 2]]])["self_bleu_across_prompts"])


# --- reward and KL ------------------------------------------------------------------------------------------


def test_reward_and_kl_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 4.0])
    policy, reference = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -5.5, -4.5])
    summary = reward_kl_summary(rewards, policy, reference)
    # log-ratios 1, 0.5, 2.5 (mean 4/3); rewards mean 7/3; sample variances 7/3 and 13/12.
    assert summary == pytest.approx(
        {"reward": 7 / 3, "reward_stderr": math.sqrt(7 / 9), "kl": 4 / 3, "kl_stderr": math.sqrt(13 / 36), "n": 3}, rel=1e-12
    )
    metric = RewardKL()
    metric.update(rewards, policy, reference)
    assert same(metric.compute(), summary)
    with pytest.raises(ValueError, match="one reward and two log-probs"):
        metric.update(rewards, policy[:2], reference)


# --- batching and DDP ---------------------------------------------------------------------------------------


def make_data(seed: int) -> dict[str, Any]:
    """Judged outcomes with length differences, grouped text samples, and rewards with log-probs."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(30)]
    outcomes, delta = length_biased_judgments(rng.randint(20, 60), seed)
    outcomes[rng.randrange(len(outcomes))] = NAN
    sizes = [rng.randint(1, 5) for _ in range(rng.randint(2, 6))]
    groups = [[" ".join(rng.choices(words, k=rng.randint(0, 15))) for _ in range(size)] for size in sizes]
    generator = torch.Generator().manual_seed(seed)
    policy = -torch.rand(len(groups), generator=generator) * 30
    return {
        "outcomes": outcomes,
        "delta": delta,
        "groups": groups,
        "rewards": torch.randn(len(groups), generator=generator),
        "policy": policy,
        "reference": policy - torch.rand(len(groups), generator=generator),
    }


def merged(shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: [x for shard in shards for x in shard[key]] if key == "groups" else torch.cat([shard[key] for shard in shards])
        for key in shards[0]
    }


def compute_all(data: dict[str, Any], lonely: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Each metric over ``data``; ``lonely`` (or nothing) goes to a WinRate that other ranks leave empty."""
    win_rate, spread, reward_kl, empty_elsewhere = WinRate(), Diversity(ngrams=(1, 2, 3)), RewardKL(), WinRate(resamples=200)
    win_rate.update(data["outcomes"], data["delta"])
    spread.update(data["groups"])
    reward_kl.update(data["rewards"], data["policy"], data["reference"])
    if lonely is not None:
        empty_elsewhere.update(lonely["outcomes"])
    metrics = {"win_rate": win_rate, "diversity": spread, "reward_kl": reward_kl, "empty_elsewhere": empty_elsewhere}
    return {name: floats(metric.compute()) for name, metric in metrics.items()}


def test_batched_updates_equal_one_update() -> None:
    shards = [make_data(seed) for seed in range(4)]
    data = merged(shards)
    whole = compute_all(data, data)
    win_rate, spread, reward_kl = WinRate(), Diversity(ngrams=(1, 2, 3)), RewardKL()
    for shard in shards:
        win_rate(shard["outcomes"], shard["delta"])  # forward: the batch's value, and accumulation
        for start in range(0, len(shard["groups"]), 2):
            spread.update(shard["groups"][start : start + 2])
        reward_kl.update(shard["rewards"], shard["policy"], shard["reference"])
    assert same(win_rate.compute(), whole["win_rate"])
    assert same(spread.compute(), whole["diversity"])
    assert same(reward_kl.compute(), whole["reward_kl"])
    assert same(win_rate_summary(data["outcomes"], data["delta"]), whole["win_rate"])


def ddp_rank(rank: int, world: int, port: int, shards: list[dict[str, Any]], result_dir: Path) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Rank 0 also holds all of one more WinRate's data: rank 1 syncs an empty state for it.
        torch.save(compute_all(shards[rank], merged(shards) if rank == 0 else None), result_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_ranks_compute_what_one_process_computes(tmp_path: Path) -> None:
    shards = [make_data(seed) for seed in (10, 11)]
    sizes = [(len(s["outcomes"]), len(s["groups"]), sum(len(g) for g in s["groups"])) for s in shards]
    assert sizes[0] != sizes[1], sizes  # uneven cat states: gathered with padding
    data = merged(shards)
    one = compute_all(data, data)
    torch.multiprocessing.start_processes(ddp_rank, args=(2, free_port(), shards, tmp_path), nprocs=2, start_method="spawn")
    for rank in range(2):
        ranked = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert ranked.keys() == one.keys()
        for name, summary in one.items():
            assert same(ranked[name], summary), (rank, name, ranked[name], summary)


def two_judges(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Verdicts of two judges that agree often but not always, with ties and unparseable answers."""
    generator = torch.Generator().manual_seed(seed)
    a = random_outcomes(n, seed)
    b = a.clone()
    flip = torch.rand(n, generator=generator) < 0.3
    b[flip] = 1 - b[flip]
    b[torch.rand(n, generator=generator) < 0.05] = 0.5
    a[:3], b[5:7] = NAN, NAN
    return a, b


def test_agreement_and_kappa_match_scikit_learn_resample_by_resample() -> None:
    np = pytest.importorskip("numpy")
    cohen_kappa_score = pytest.importorskip("sklearn.metrics").cohen_kappa_score
    a, b = two_judges(240, seed=7)
    summary = agreement_summary(a, b, resamples=200, seed=3)
    valid = ~(a.isnan() | b.isnan())
    x, y = (t[valid].numpy().astype(str) for t in (a, b))  # categories, as sklearn's labels
    assert summary["n"] == valid.sum() == 235
    assert summary["kappa"] == pytest.approx(cohen_kappa_score(x, y), abs=1e-12)
    assert summary["agreement"] == pytest.approx(float((x == y).mean()), abs=1e-12)
    # the bootstrap: the same draws of the 235 comparisons, scored one by one by scikit-learn
    drawn = torch.randint(235, (200, 235), generator=torch.Generator().manual_seed(3)).numpy()
    kappas = np.array([cohen_kappa_score(x[rows], y[rows]) for rows in drawn])
    assert summary["kappa_stderr"] == pytest.approx(kappas.std(ddof=1), abs=1e-12)
    assert [summary["kappa_ci_low"], summary["kappa_ci_high"]] == pytest.approx(np.percentile(kappas, [2.5, 97.5]), abs=1e-12)
    agreements = np.array([(x[rows] == y[rows]).mean() for rows in drawn])
    assert [summary["agreement_ci_low"], summary["agreement_ci_high"]] == pytest.approx(
        np.percentile(agreements, [2.5, 97.5]), abs=1e-12
    )
    assert summary["agreement_stderr"] == pytest.approx((x == y).std(ddof=1) / math.sqrt(235), abs=1e-12)


def test_kappa_is_chance_corrected_and_undefined_without_variation() -> None:
    cohen_kappa_score = pytest.importorskip("sklearn.metrics").cohen_kappa_score
    a = random_outcomes(400, seed=11)
    independent = random_outcomes(400, seed=12)
    assert abs(agreement_summary(a, independent)["kappa"]) < 0.1  # agreeing by chance alone: κ near 0
    assert agreement_summary(a, a)["kappa"] == 1.0
    opposite = agreement_summary(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert opposite["kappa"] == cohen_kappa_score([1, 0, 1, 0], [0, 1, 0, 1]) == -1.0 and opposite["agreement"] == 0
    constant = agreement_summary(torch.ones(5), torch.ones(5))
    assert constant["agreement"] == 1 and math.isnan(constant["kappa"])  # p_e = 1: scikit-learn's 0/0 too


def test_position_bias_by_hand() -> None:
    # pairs: (candidate first, candidate second): a consistent win, a judge that always picks A, one always B, NaN
    summary = position_bias_summary(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, NAN]))
    assert summary["swapped"] == 3
    assert summary["first_position_wins"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert summary["self_consistency"] == pytest.approx(1 / 3)


def test_kl_summary_is_the_mean_log_ratio() -> None:
    policy, reference = torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([-2.0, -2.0, -3.0])
    assert kl_summary(policy, reference) == pytest.approx({"kl": 0.0, "kl_stderr": math.sqrt(1.0 / 3)})
