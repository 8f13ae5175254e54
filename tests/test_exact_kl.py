"""The exact KL(π‖π_ref) of the synthetic-token task: equal to the sum over every response enumerated whole, and to
what the benchmark's own sampler draws (a z-test of the sampled log-ratio's mean against it)."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from expo_bench.lm.evaluator import sequence_logps
from expo_bench.lm.exact import enumerable, sequence_kl
from expo_bench.lm.sampling import SamplingConfig, sample_responses

VOCABULARY, EOS, PAD, NEW_TOKENS = 6, 5, 4, 3
PROMPTS = [[0, 1], [2, 3]]


def tiny(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCABULARY, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def models() -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    return tiny(0), tiny(1)


def every_response() -> list[list[int]]:
    """Every response sampling can end with: k < 3 non-EOS tokens then EOS, or 3 non-EOS tokens (the limit)."""
    words = [token for token in range(VOCABULARY) if token != EOS]
    ended = [[*head, EOS] for length in range(NEW_TOKENS) for head in itertools.product(words, repeat=length)]
    return ended + [list(head) for head in itertools.product(words, repeat=NEW_TOKENS)]


def test_it_is_the_sum_over_every_whole_response(models: tuple[GPT2LMHeadModel, GPT2LMHeadModel]) -> None:
    policy, reference = models
    responses = every_response()
    expected = []
    for prompt in PROMPTS:
        rows = [prompt] * len(responses)
        logp = sequence_logps(policy, rows, responses, PAD, 512)
        logr = sequence_logps(reference, rows, responses, PAD, 512)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)  # the whole space (float32 logits)
        expected.append(float((logp.exp() * (logp - logr)).sum()))
    assert sequence_kl(policy, reference, PROMPTS, NEW_TOKENS, EOS) == pytest.approx(expected, abs=1e-6)
    assert sequence_kl(policy, policy, PROMPTS, NEW_TOKENS, EOS) == pytest.approx([0.0, 0.0], abs=1e-12)


def test_it_is_what_the_sampler_draws(models: tuple[GPT2LMHeadModel, GPT2LMHeadModel]) -> None:
    """The mean log-ratio of 4,000 samples per prompt from the benchmark's sampler (temperature 1, no top-k or top-p)
    lies within 4 standard errors of the exact KL: samples from another distribution (a hidden top-k) would not."""
    policy, reference = models
    config = SamplingConfig(samples_per_prompt=4000, max_new_tokens=NEW_TOKENS, batch_size=8)
    samples = sample_responses(policy, PROMPTS, config, PAD, EOS, seed=0)
    exact = sequence_kl(policy, reference, PROMPTS, NEW_TOKENS, EOS)
    for prompt, responses, kl in zip(PROMPTS, samples, exact, strict=True):
        rows = [prompt] * len(responses)
        ratios = (
            sequence_logps(policy, rows, responses, PAD, 512) - sequence_logps(reference, rows, responses, PAD, 512)
        ).tolist()
        z = (statistics.fmean(ratios) - kl) / (statistics.stdev(ratios) / math.sqrt(len(ratios)))
        assert abs(z) < 4, (kl, statistics.fmean(ratios), z)


def test_a_space_too_large_to_enumerate_is_said_not_attempted(models: tuple[GPT2LMHeadModel, GPT2LMHeadModel]) -> None:
    policy, reference = models
    assert enumerable(policy, NEW_TOKENS) and not enumerable(policy, 64)
    with pytest.raises(ValueError, match="too many to enumerate"):
        sequence_kl(policy, reference, PROMPTS, 64, EOS)
