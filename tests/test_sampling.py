"""Sampling draws exactly the distribution the config names: goodness-of-fit against the model's softmax."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scipy import stats
from transformers import GenerationConfig

from expo_bench.errors import RecipeError
from expo_bench.lm.model import ModelConfig
from expo_bench.lm.sampling import SamplingConfig, sample_responses
from expo_bench.recipe import validate_recipe

VOCABULARY = 1000
DRAWS = 4000
TINY = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 16, "vocab_size": VOCABULARY}  # fmt: skip


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    model = ModelConfig(tiny=TINY).build()
    with torch.no_grad():  # a spread-out next-token distribution: most of its mass lies outside any top-50
        model.get_output_embeddings().weight.mul_(5)
    # what a hub checkpoint may ship: none of it may reach the samples
    model.generation_config = GenerationConfig(top_k=5, repetition_penalty=3.0, bad_words_ids=[[7]])
    return model.eval()


def next_token_probabilities(model: Any, prompt: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1)


def goodness_of_fit(model: Any, temperature: float, top_k: int = 0) -> tuple[float, float]:
    """χ² p-value of DRAWS one-token samples against softmax(logits / T) (cells with expected count < 5 pooled), and
    the model's probability mass outside its 50 most likely tokens."""
    prompt = [3, 17]
    config = SamplingConfig(samples_per_prompt=DRAWS, max_new_tokens=1, temperature=temperature, top_k=top_k, batch_size=1)
    [samples] = sample_responses(model, [prompt], config, pad_token_id=0, eos_token_id=VOCABULARY + 1, seed=1)
    counts = torch.bincount(torch.tensor([sample[0] for sample in samples]), minlength=VOCABULARY).double()
    probabilities = next_token_probabilities(model, prompt, temperature)
    expected = probabilities * DRAWS
    large = expected >= 5
    observed = torch.cat([counts[large], counts[~large].sum()[None]])
    wanted = torch.cat([expected[large], expected[~large].sum()[None]])
    outside_top_50 = 1 - float(probabilities.topk(50).values.sum())
    return float(stats.chisquare(observed.numpy(), wanted.numpy()).pvalue), outside_top_50


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_the_tempered_softmax(model: Any, temperature: float) -> None:
    p_value, outside = goodness_of_fit(model, temperature)
    assert outside > 0.6  # a hidden top-50 would leave these tokens unsampled
    assert p_value > 1e-3


def test_the_test_detects_truncation(model: Any) -> None:
    p_value, _ = goodness_of_fit(model, 1.0, top_k=50)
    assert p_value < 1e-12


def test_the_model_generation_config_is_restored(model: Any) -> None:
    goodness_of_fit(model, 1.0)
    assert model.generation_config.top_k == 5 and model.generation_config.repetition_penalty == 3.0


def test_truncated_reference_samples_are_refused() -> None:
    recipe = {
        "experiment": "x",
        "task": {
            "kind": "synthetic_tokens",
            "reference_samples": {"samples_per_prompt": 2, "temperature": 0.7, "top_k": 10},
        },
        "methods": [{"method": "expo_compositional"}],
    }
    with pytest.raises(RecipeError) as caught:
        validate_recipe(recipe, "x.yaml")
    [(path, message)] = caught.value.problems
    assert path == "task.reference_samples" and "must come from π_ref itself" in message and "top_k 10" in message
