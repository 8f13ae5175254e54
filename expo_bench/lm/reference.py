"""Work on the reference that every method of a sweep shares, done once per seed and cached on disk: its samples
(EXPO's KL(π_ref ‖ π) needs responses y ~ π_ref) and its log-probs of every pair and sample. It comes back as one
frozen :class:`ReferenceWork`, from which the seed's datasets are built once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor
from transformers import PreTrainedModel

from expo_bench.cache import cached
from expo_bench.lm.data import PairDataset, reference_logps, reference_sample_logps
from expo_bench.lm.model import CausalLMScorer
from expo_bench.lm.sampling import SamplingConfig, sample_responses
from expo_bench.lm.tokenize import TokenizedPair
from expo_bench.reporting import after, progress

Splits = tuple[Sequence[TokenizedPair], Sequence[TokenizedPair]]
"""A seed's training and held-out pairs."""


@dataclass(frozen=True)
class ReferenceWork:
    """What a seed's methods share from the reference, per split (training, held-out): its samples for each pair's
    prompt, its log-probs of each pair's (chosen, rejected), and of each sample; None where the recipe asks for none."""

    samples: tuple[list[list[list[int]]], list[list[list[int]]]] | None = None
    pair_logps: tuple[Tensor, Tensor] | None = None
    sample_logps: tuple[list[list[float]], list[list[float]]] | None = None
    samples_per_epoch: int | None = None
    """Where samples were drawn for every epoch up front: how many each epoch uses."""

    def datasets(self, splits: Splits, pad: int) -> tuple[PairDataset, PairDataset]:
        train, held_out = (
            PairDataset(
                pairs,
                pad,
                None if self.pair_logps is None else self.pair_logps[index],
                None if self.samples is None else self.samples[index],
                None if self.sample_logps is None else self.sample_logps[index],
                self.samples_per_epoch,
            )
            for index, pairs in enumerate(splits)
        )
        return train, held_out


def reference_work(
    base: PreTrainedModel,
    splits: Splits,
    pad: int,
    eos: int,
    sampling: SamplingConfig | None,
    samples_per_epoch: int | None,
    logps_batch_size: int | None,
    seed: int,
    key: dict[str, Any],
    cache_dir: Path,
    console: Console,
) -> ReferenceWork:
    """Reference samples (``sampling``; first: the cached log-probs cover the samples too), then the reference's
    log-probs of every pair and sample (``logps_batch_size``; None: the methods run the reference themselves)."""
    samples = None
    if sampling is not None:
        key = key | {"sampling": sampling.model_dump(), "seed": seed}
        samples = _samples(base, splits, pad, eos, sampling, seed, key, cache_dir, console)
    if logps_batch_size is None:
        return ReferenceWork(samples, samples_per_epoch=samples_per_epoch)
    pair_logps, sample_logps = _logps(
        base, ReferenceWork(samples).datasets(splits, pad), logps_batch_size, key, cache_dir, console
    )
    return ReferenceWork(samples, pair_logps, sample_logps, samples_per_epoch)


def _samples(
    base: PreTrainedModel,
    splits: Splits,
    pad: int,
    eos: int,
    sampling: SamplingConfig,
    seed: int,
    key: dict[str, Any],
    cache_dir: Path,
    console: Console,
) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
    """Responses sampled from ``base`` for every pair's prompt, per split."""
    prompts = [pair.prompt_ids for pairs in splits for pair in pairs]

    def compute() -> list[list[list[int]]]:
        with progress(console, "reference samples (prompts)", len(prompts)) as done:
            return sample_responses(base, prompts, sampling, pad, eos, seed, done)

    samples, hit = cached(cache_dir, "reference-samples", key, compute)
    console.print(f"{sampling.samples_per_prompt} reference samples per prompt: {'from the cache' if hit else 'drawn once'}")
    split = len(splits[0])
    return samples[:split], samples[split:]


def _logps(
    base: PreTrainedModel,
    datasets: tuple[PairDataset, PairDataset],
    batch_size: int,
    key: dict[str, Any],
    cache_dir: Path,
    console: Console,
) -> tuple[tuple[Tensor, Tensor], tuple[list[list[float]], list[list[float]]] | None]:
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
    console.print(f"reference log-probs of {len(logps)} pairs: {'from the cache' if hit else 'computed once for every method'}")
    samples = None if values["samples"] is None else (values["samples"][0], values["samples"][1])
    return (logps[:split], logps[split:]), samples
