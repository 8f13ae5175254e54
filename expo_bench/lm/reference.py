"""Work on the reference that every method of a sweep shares, done once per seed and cached on disk: its samples
(EXPO's KL(π_ref ‖ π) needs responses y ~ π_ref) and its log-probs of every pair and sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import PreTrainedModel

from expo_bench.cache import cached
from expo_bench.lm.data import PairDataset, reference_logps, reference_sample_logps
from expo_bench.lm.model import CausalLMScorer
from expo_bench.lm.sampling import SamplingConfig, sample_responses
from expo_bench.reporting import after, progress


def attach_reference_samples(
    base: PreTrainedModel,
    datasets: tuple[PairDataset, PairDataset],
    sampling: SamplingConfig,
    eos: int,
    seed: int,
    key: dict[str, Any],
    cache_dir: Path,
    console: Console,
) -> None:
    """Responses sampled from ``base`` for every pair's prompt, attached to the training and held-out datasets."""
    prompts = [pair.prompt_ids for dataset in datasets for pair in dataset.pairs]

    def compute() -> list[list[list[int]]]:
        with progress(console, "reference samples (prompts)", len(prompts)) as done:
            return sample_responses(base, prompts, sampling, datasets[0].pad_token_id, eos, seed, done)

    samples, hit = cached(cache_dir, "reference-samples", key, compute)
    split = len(datasets[0])
    datasets[0].reference_samples, datasets[1].reference_samples = samples[:split], samples[split:]
    console.print(f"{sampling.samples_per_prompt} reference samples per prompt: {'from the cache' if hit else 'drawn once'}")


def attach_reference_logps(
    base: PreTrainedModel,
    datasets: tuple[PairDataset, PairDataset],
    batch_size: int,
    key: dict[str, Any],
    cache_dir: Path,
    console: Console,
) -> None:
    """Reference log-probs of every pair, and of every reference sample when the datasets carry samples."""
    device = next(base.parameters()).device
    scorer = CausalLMScorer(base).eval()

    def compute() -> dict[str, Any]:
        parts: list[torch.Tensor] = []
        with progress(console, "reference log-probs (pairs)", sum(len(dataset) for dataset in datasets)) as done:
            for dataset in datasets:
                parts.append(reference_logps(scorer, dataset, batch_size, device, after(done, sum(map(len, parts)))))
        pairs = torch.cat(parts)
        if datasets[0].reference_samples is None:
            return {"pairs": pairs, "samples": None}
        return {
            "pairs": pairs,
            "samples": [reference_sample_logps(scorer, dataset, batch_size, device) for dataset in datasets],
        }

    values, hit = cached(cache_dir, "reference-logps", key, compute)
    logps, split = values["pairs"], len(datasets[0])
    datasets[0].reference_logps, datasets[1].reference_logps = logps[:split], logps[split:]
    if values["samples"] is not None:
        datasets[0].reference_sample_logps, datasets[1].reference_sample_logps = values["samples"]
    console.print(f"reference log-probs of {len(logps)} pairs: {'from the cache' if hit else 'computed once for every method'}")
