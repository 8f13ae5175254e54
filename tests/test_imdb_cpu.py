"""The CPU-scale IMDb experiment (recipes/imdb_cpu.yaml): its fitted tokenizer, its SFT model's bigram baseline, its
independent second scorer, disjoint training / selection / reported prompts, the leaderboard at KL budgets, and the
recipe rehearsed as shipped through the installed console script."""

from __future__ import annotations

import csv
import io
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SHARED_DATA, needs_shared_data
from rich.console import Console

from expo_bench import tracking
from expo_bench.errors import RecipeError
from expo_bench.leaderboard.render import _caption, write_leaderboard
from expo_bench.leaderboard.table import StoredRun, build_table
from expo_bench.lm.fitted_tokenizer import TokenizerFit
from expo_bench.lm.imdb import load_reviews
from expo_bench.lm.ngram import PRIOR_WEIGHTS, Bigram, bigram_nll
from expo_bench.lm.tokenize import TokenizedPair, fingerprint_tokenizer
from expo_bench.metric_keys import KL, REWARD, selection_key
from expo_bench.recipe import validate_recipe
from expo_bench.tasks.imdb import IMDbTask, RewardModelConfig, in_fold, independence_problem

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "imdb_cpu.yaml"
pytestmark = needs_shared_data()


def shipped() -> dict[str, Any]:
    data = yaml.safe_load(RECIPE.read_text())
    data["task"]["source"] = str(SHARED_DATA / "imdb")  # the recipe names it relative to the repository root
    return data


# --- the fitted tokenizer -------------------------------------------------------------------------------------


def test_a_fitted_tokenizer_round_trips_reviews_and_is_cached(tmp_path: Path) -> None:
    texts = [review.text for review in load_reviews(str(SHARED_DATA / "imdb"), "train_sample")]
    fit = TokenizerFit(vocab_size=600)
    first = fit.tokenizer(texts, tmp_path)
    assert len(first) == 600 and first.eos_token_id == 0 and first.eos_token == "<|endoftext|>"
    for text in texts[:50]:  # byte-level: every review decodes to itself
        assert first.decode(first(text, add_special_tokens=False)["input_ids"]) == text
    [entry] = tmp_path.glob("fitted-tokenizer-*.pt")
    again = fit.tokenizer(texts, tmp_path)
    assert fingerprint_tokenizer(again) == fingerprint_tokenizer(first)
    assert list(tmp_path.glob("fitted-tokenizer-*.pt")) == [entry]  # read back, not fitted again
    other = TokenizerFit(vocab_size=700).tokenizer(texts, tmp_path)
    assert len(other) == 700 and len(list(tmp_path.glob("fitted-tokenizer-*.pt"))) == 2


def test_only_a_task_with_texts_of_its_own_fits_a_tokenizer() -> None:
    data = yaml.safe_load((ROOT / "recipes" / "your_pairs_tiny.yaml").read_text())
    data["task"]["tokenizer"] = {"fit": {"vocab_size": 1000}}
    with pytest.raises(RecipeError, match="no texts of its own to fit a tokenizer"):
        validate_recipe(data, ROOT / "recipes" / "your_pairs_tiny.yaml")


# --- the bigram baseline ----------------------------------------------------------------------------------------


def example(prompt: list[int], chosen: list[int]) -> TokenizedPair:
    return TokenizedPair(prompt, chosen, chosen, False, False)


def test_the_bigram_is_a_distribution_and_matches_a_hand_derivation() -> None:
    train = [example([0], [1, 2, 0]), example([0], [1, 1, 0])]  # transitions 0→1 ×2, 1→2, 2→0, 1→1, 1→0
    bigram = Bigram(train, vocab_size=3)
    for previous in range(3):  # every context's next-token probabilities sum to one
        total = 0.0
        for token in range(3):
            total += math.exp(-bigram.nll([example([previous], [token])], prior_weight=2.0))
        assert total == pytest.approx(1.0)
    # by hand: c(1→2)=1, c(1)=3 (1→2, 1→1, 1→0), P_uni(2) = (1+1)/(6+3) = 2/9, α = 2
    assert bigram.nll([example([1], [2])], 2.0) == pytest.approx(-math.log((1 + 2 * 2 / 9) / (3 + 2)))


def test_the_bigram_baseline_picks_its_prior_on_training_data_only() -> None:
    train = [example([0], [1, 2, 0])] * 9 + [example([0], [2, 1, 0])]
    held_out = [example([0], [2, 2, 0])]
    # the prior weight is the one best on the last tenth of train (one example) for a bigram fitted on the rest
    fit, tune = train[:9], train[9:]
    best = min(PRIOR_WEIGHTS, key=lambda weight: Bigram(fit, 3).nll(tune, weight))
    assert bigram_nll(train, held_out, vocab_size=3) == pytest.approx(Bigram(train, 3).nll(held_out, best))
    assert best == PRIOR_WEIGHTS[-1]  # tune's transitions never occur in fit: the most smoothing wins


# --- the second scorer's independence ----------------------------------------------------------------------------


def test_folds_partition_the_reviews_and_the_two_scorers_never_share_one() -> None:
    task = IMDbTask.model_validate(shipped()["task"])
    assert task.second_reward_model is not None
    reviews = load_reviews(str(SHARED_DATA / "imdb"), "train")
    labeller = {review.id for review in task.reward_model.fitting_reviews(reviews)}
    second = {review.id for review in task.second_reward_model.fitting_reviews(reviews)}
    assert not labeller & second and len(labeller | second) == len(reviews) == 25_000
    for ids in (labeller, second):  # the files are sorted by label: a fold is not a one-sided prefix
        labels = [review.label for review in reviews if review.id in ids]
        assert 0.45 < sum(labels) / len(labels) < 0.55
    assert all(sum(in_fold(review.id, k, 3) for k in range(3)) == 1 for review in reviews[:500])
    assert task.reward_model.kind != task.second_reward_model.kind  # another model family too


@pytest.mark.parametrize(
    ("second", "complaint"),
    [
        ({"kind": "naive_bayes", "fold": [0, 2]}, "each needs its own fold"),
        ({"kind": "naive_bayes"}, "each needs its own fold"),
        ({"kind": "naive_bayes", "fold": [1, 3]}, "each needs its own fold"),
    ],
)
def test_a_second_scorer_that_saw_the_labeller_s_reviews_is_refused(second: dict[str, Any], complaint: str) -> None:
    data = shipped()
    data["task"]["second_reward_model"] = second
    with pytest.raises(RecipeError, match=complaint):
        validate_recipe(data, "imdb_cpu.yaml")


def test_hub_scorers_must_be_two_models() -> None:
    hub = RewardModelConfig(kind="huggingface", name_or_path="org/sentiment")
    assert independence_problem(hub, hub) == "both are org/sentiment"
    assert independence_problem(hub, RewardModelConfig(kind="huggingface", name_or_path="org/other")) is None
    assert independence_problem(hub, RewardModelConfig(kind="naive_bayes")) is None


def test_the_second_scorer_is_fitted_on_its_fold_and_reads_sentiment(tmp_path: Path) -> None:
    reviews = load_reviews(str(SHARED_DATA / "imdb"), "train_sample")
    config = RewardModelConfig(kind="naive_bayes", fold=(1, 2))
    scorer = config.build(reviews, 0, tmp_path)
    [saved] = tmp_path.glob("sentiment-naive_bayes-*.skops")
    assert config.build(reviews, 0, tmp_path).score(["a wonderful film"]) == scorer.score(["a wonderful film"])
    assert saved.exists()
    good, bad = scorer.score(["A wonderful, moving film. Brilliant acting.", "Awful. The worst, most boring film ever."])
    assert good > 0.5 > bad


# --- disjoint prompts ----------------------------------------------------------------------------------------------


def rehearsed(tmp_path: Path) -> dict[str, Any]:
    """The shipped recipe with only what this machine lacks changed: sizes (a smaller model, fewer reviews and prompts,
    one seed) and the data's location."""
    data = shipped()
    task = data["task"]
    task |= {"train_split": "train_sample", "eval_split": "test_sample", "train_prompts": 48, "eval_prompts": 60}
    task["model"]["tiny"] |= {"n_embd": 32, "n_layer": 1, "n_head": 2}
    task["tokenizer"]["fit"]["vocab_size"] = 512
    task["completions"]["max_new_tokens"] = task["reference_samples"]["max_new_tokens"] = 12
    task["evaluation"] |= {"max_new_tokens": 12, "selection": {"prompts": 10}}
    task["margin"] = 0.02  # a barely trained 32-wide model's completions differ little in sentiment
    data["seeds"] = [0]
    return data


def test_training_selection_and_reported_prompts_are_disjoint(tmp_path: Path) -> None:
    from expo_bench.sweep.language_model import LanguageModelSweep

    task = validate_recipe(rehearsed(tmp_path), tmp_path / "imdb_cpu.yaml").recipe.task
    assert isinstance(task, IMDbTask) and task.evaluation is not None and task.evaluation.selection is not None
    tokenizer = task.load_tokenizer(tmp_path)
    model = task.model.build(vocab_size=len(tokenizer))
    examples = task.sft_examples(0, tokenizer, Console(quiet=True))
    data = task.task_data(0, tokenizer, model, examples, tmp_path, Console(quiet=True))
    found = LanguageModelSweep._held_out_prompts(data, tokenizer)
    cut = task.evaluation.selection.prompts
    selection = {tuple(ids) for ids in found.cut(0, cut).prompt_ids}
    reported = {tuple(ids) for ids in found.cut(cut, None).prompt_ids}
    training = {tuple(pair.prompt_ids) for pair in data.train}
    assert len(selection) == cut and len(reported) == len(found) - cut > 0
    assert not selection & reported and not (selection | reported) & training
    assert len(data.judges) == 2 and [judge.name for judge in data.judges] == ["tfidf-logreg", "char-naive-bayes"]
    assert data.provenance["bigram_val_nll"] > 0


# --- the leaderboard at KL budgets ---------------------------------------------------------------------------------


def test_a_kl_budget_table_picks_each_method_within_the_budget_on_selection_kl() -> None:
    def run(method: str, key: str, reward: float, kl: float, seed: int) -> StoredRun:
        tags = {tracking.METHOD: method, tracking.CONFIG_KEY: key, tracking.SEED: str(seed)}
        tags |= {tracking.RANK_METRIC: REWARD.key, tracking.RANK_GOAL: "max"}
        tags[tracking.SELECTION_METRIC] = selection_key(REWARD.key)
        metrics = {REWARD.key: reward + 0.01 * seed, KL.key: kl, selection_key(REWARD.key): reward, selection_key(KL.key): kl}
        return StoredRun(f"{key}-{seed}", metrics, {"params.beta": key}, tags)

    runs = [run("dpo", "dpo-far", 0.9, 12.0, s) for s in range(3)] + [run("dpo", "dpo-near", 0.6, 2.0, s) for s in range(3)]
    runs += [run("ipo", "ipo-near", 0.7, 2.5, s) for s in range(3)] + [run("simpo", "simpo", 0.95, 20.0, s) for s in range(3)]
    free = build_table("sqlite:///store.db", "demo", "imdb", runs)
    assert [row.config_key for row in free.rows] == ["simpo", "dpo-far", "ipo-near"]
    within = build_table("sqlite:///store.db", "demo", "imdb", runs, kl_budget=3.0)
    assert [row.config_key for row in within.rows] == ["ipo-near", "dpo-near"] and within.unranked == ("simpo",)
    assert within.verdicts["ipo"].versus_baseline is not None
    assert within.verdicts["ipo"].versus_baseline.mean == pytest.approx(0.1)
    assert "at most 3 compete" in _caption(within) and "no configuration within KL ≤ 3" in _caption(within)


# --- the shipped recipe, rehearsed ---------------------------------------------------------------------------------


@pytest.mark.slow  # about 4 minutes on 2 cores
def test_the_shipped_recipe_runs_through_the_console_script(tmp_path: Path) -> None:
    """Every stage the 90-minute run goes through, on sizes this test can afford: two methods, one λ each."""
    script = shutil.which("expo-bench", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no expo-bench console script next to this Python (pip install -e .)")
    recipe = tmp_path / "imdb_cpu.yaml"
    recipe.write_text(yaml.safe_dump(rehearsed(tmp_path), sort_keys=False))
    command = [script, "run", str(recipe), "--results", str(tmp_path / "results"), "--only", "method=dpo,expo_compositional"]
    command += ["--set", "methods.0.grid.beta=[0.1]", "--set", "methods.4.grid.lam=[0.1]"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    out = tmp_path / "results" / "imdb_cpu"
    with (out / "leaderboard.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"dpo", "expo_compositional", "sft-reference"}
    for row in rows.values():  # both scorers judged every policy
        assert 0 <= float(row["eval/reward"]) <= 1 and 0 <= float(row["eval/j2/reward"]) <= 1
        assert row["selected_by"] == "selection/reward"
    with (out / "leaderboard-kl-budgets.csv").open() as handle:
        assert {float(row["kl_budget"]) for row in csv.DictReader(handle)} <= {3.0, 10.0}
    samples = [json.loads(line) for line in lzma.decompress((out / "samples.jsonl.xz").read_bytes()).splitlines()]
    assert {sample["method"] for sample in samples} == set(rows)
    assert set(samples[0]) >= {"prompt", "completion", "method", "lam", "seed", "reward"}
    summary = json.loads((out / "summary.json").read_text())
    facts = summary["runs"][0]
    assert facts["sft_val_nll_after"] < facts["sft_val_nll_before"] and facts["bigram_val_nll"] > 0


def test_a_gain_the_second_judge_does_not_see_is_flagged(tmp_path: Path) -> None:
    def run(method: str, reward: float, second: float, seed: int) -> StoredRun:
        tags = {tracking.METHOD: method, tracking.CONFIG_KEY: method, tracking.SEED: str(seed)}
        tags |= {tracking.RANK_METRIC: REWARD.key, tracking.RANK_GOAL: "max"}
        return StoredRun(f"{method}-{seed}", {REWARD.key: reward, "eval/j2/reward": second}, {}, tags)

    noise = (0.0, 0.01, -0.01)
    runs = [run("dpo", 0.6 + e, 0.6 + e, s) for s, e in enumerate(noise)]
    runs += [run("hacker", 0.8 + e, 0.6 - e, s) for s, e in enumerate(noise)]  # the labeller's gain alone
    runs += [run("honest", 0.7 + e, 0.7 + e, s) for s, e in enumerate(noise)]  # seen by both judges
    table = build_table("sqlite:///store.db", "demo", "imdb", runs)
    assert set(table.verdicts["hacker"].unconfirmed) == {"j2"} and table.verdicts["honest"].unconfirmed == {}
    assert table.verdicts["dpo"].unconfirmed == {}
    output = io.StringIO()
    write_leaderboard([table], tmp_path, Console(file=output, width=200))
    assert "gain not confirmed by j2" in output.getvalue()
