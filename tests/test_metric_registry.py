"""Sample metrics register themselves: the evaluator runs every registered metric on each policy's samples, so a new
metric is a declaration in ``metric_keys`` and a function in ``evaluation.metrics``, with the evaluator untouched."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from expo_bench import metric_keys
from expo_bench.evaluation.metrics import SAMPLE_METRICS, EvaluatedSamples, sample_metric
from expo_bench.evaluation.types import Comparison, Verdict
from expo_bench.lm.evaluator import EvaluationConfig, Evaluator, HeldOutPrompts
from expo_bench.reporting import Done

VOCABULARY, EOS = 11, 10
LONGEST = metric_keys.Metric("eval/longest_sample", "longest sample", "max", spread=False)


class CharacterCounter:
    """A judge that rewards a response by its length in characters and prefers the longer one."""

    name = "character-counter"
    gives_rewards = True

    def judge(self, comparisons: Sequence[Comparison], done: Done | None = None) -> list[Verdict]:
        verdicts = []
        for comparison in comparisons:
            ahead = len(comparison.candidate) - len(comparison.baseline)
            outcome = 0.5 if ahead == 0 else float(ahead > 0)
            verdicts.append(Verdict(outcome, {}, candidate_reward=float(len(comparison.candidate))))
        return verdicts


class Digits:
    """Token ``t`` decodes to the digit ``t`` (EOS to nothing)."""

    eos_token_id = EOS
    pad_token_id = None
    name_or_path = "digits"

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(str(token) for token in ids if token != EOS)


def tiny(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCABULARY, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def longest_sample(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A user's metric, registered for one test: the longest sample of the evaluation, in tokens."""
    monkeypatch.setitem(metric_keys.CATALOG, LONGEST.key, LONGEST)

    @sample_metric("longest_sample", LONGEST)
    def longest(evaluated: EvaluatedSamples) -> dict[str, float]:
        return {LONGEST.name: float(max(len(sample) for group in evaluated.samples for sample in group))}

    yield
    del SAMPLE_METRICS["longest_sample"]


def evaluate(tmp_path: Path) -> tuple[dict[str, float], Path]:
    prompts = [[0, 1], [2, 3, 4], [5]]
    held_out = HeldOutPrompts(prompts, ["01", "234", "5"], [[6, 7], [8], [9]])
    config = EvaluationConfig(temperatures=[1.0], samples_per_prompt=3, max_new_tokens=5, bootstrap_resamples=20)
    evaluator = Evaluator(config, Digits(), tiny(0), held_out, [CharacterCounter()], seed=0, cache_dir=tmp_path / "cache")  # type: ignore[arg-type]
    return evaluator.evaluate(tiny(1), tmp_path / "out", {"method": "tiny"}), tmp_path / "out" / "T1" / "samples.jsonl"


def test_a_registered_metric_is_computed_on_every_policy_without_touching_the_evaluator(
    tmp_path: Path, longest_sample: None
) -> None:
    results, samples_file = evaluate(tmp_path)
    responses = [json.loads(line)["response"] for line in samples_file.read_text().splitlines()]
    assert len(responses) == 9
    expected = float(max(len(response) for response in responses))  # one character per token, EOS stripped
    assert results[LONGEST.key] == expected and results["eval/T1/longest_sample"] == expected
    # the built-in metrics are still there, computed from the same samples
    assert results[metric_keys.REWARD.key] == pytest.approx(sum(len(response) for response in responses) / 9)
    assert results[metric_keys.JUDGED.key] == 9 and 0 <= results[metric_keys.WIN_RATE.key] <= 1
    assert {metric_keys.DISTINCT_2.key, metric_keys.KL.key, metric_keys.MEAN_LENGTH.key} <= set(results)


def test_every_declared_output_of_a_registered_metric_is_computed(tmp_path: Path) -> None:
    results, _ = evaluate(tmp_path)
    for name, registered in SAMPLE_METRICS.items():
        assert registered.outputs, name
        for metric in registered.outputs:
            assert metric_keys.CATALOG[metric.key] is metric and metric.key in results, (name, metric.key)


def test_a_metric_must_declare_its_keys_and_take_a_free_name() -> None:
    def nothing(evaluated: EvaluatedSamples) -> dict[str, float]:
        return {}

    with pytest.raises(ValueError, match=r"declare its outputs in expo_bench\.metric_keys"):
        sample_metric("undeclared", LONGEST)(nothing)
    with pytest.raises(ValueError, match="declare its outputs"):
        sample_metric("no_outputs")(nothing)
    with pytest.raises(ValueError, match="'win_rate' is registered twice"):
        sample_metric("win_rate", metric_keys.WIN_RATE)(nothing)
    assert list(SAMPLE_METRICS) == ["reward_kl", "win_rate", "diversity"]
