"""Tabular preference data: pairs sampled as in the EXPO authors' code, and the exact population.

Responses are indices 0..R-1 for each prompt. The ground truth is Bradley–Terry on π*:
p*(i ≻ j) = π*(i) / (π*(i) + π*(j)).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from expo_bench.contracts import PreferenceBatch, whole_batch


def bradley_terry(pi_star: Sequence[float], i: int, j: int) -> float:
    return pi_star[i] / (pi_star[i] + pi_star[j])


@dataclass(frozen=True)
class TabularPairs:
    """Pairs (prompt, chosen, rejected) with label z = P(chosen ≻ rejected)."""

    prompt: Tensor
    chosen: Tensor
    rejected: Tensor
    label: Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])


def sample_pairs(pi_stars: Sequence[Sequence[float]], draws_per_prompt: int, seed: int) -> TabularPairs:
    """The authors' protocol, with Python's ``random`` as their code uses it.

    For each prompt: draw y1, y2 uniformly with replacement ``draws_per_prompt`` times, drop y1 == y2,
    and order each pair by a Bernoulli(p*(y1 ≻ y2)) draw; then shuffle all prompts' pairs together.
    Seed 100 with one prompt and 300 draws gives the paper's 213 pairs.
    """
    rng = random.Random(seed)
    rows: list[tuple[int, int, int]] = []
    for prompt, pi_star in enumerate(pi_stars):
        top = len(pi_star) - 1
        for _ in range(draws_per_prompt):
            y1, y2 = rng.randint(0, top), rng.randint(0, top)
            if y1 != y2:
                rows.append((prompt, y1, y2) if rng.random() < bradley_terry(pi_star, y1, y2) else (prompt, y2, y1))
    if len(pi_stars) > 1:
        rng.shuffle(rows)
    columns = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return TabularPairs(columns[:, 0], columns[:, 1], columns[:, 2], torch.ones(len(rows)))


def population_pairs(pi_stars: Sequence[Sequence[float]]) -> TabularPairs:
    """Every unordered pair i < j once per prompt, labelled with p*(i ≻ j).

    Uniform draws make every unordered pair equally likely, so the mean loss over these pairs is the
    expected loss over the sampling protocol: the exact population objective, free of sampling noise.
    """
    rows = [
        (prompt, i, j, bradley_terry(pi_star, i, j))
        for prompt, pi_star in enumerate(pi_stars)
        for i in range(len(pi_star))
        for j in range(i + 1, len(pi_star))
    ]
    prompt, chosen, rejected, label = zip(*rows, strict=True)
    return TabularPairs(torch.tensor(prompt), torch.tensor(chosen), torch.tensor(rejected), torch.tensor(label))


class TabularPairDataset(Dataset[PreferenceBatch]):
    """Builds a whole batch per ``__getitems__`` call: no per-item collation on the hot path."""

    def __init__(self, pairs: TabularPairs, pi_ref: Tensor) -> None:
        self.pairs = pairs
        self.pi_ref = pi_ref

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, indices: list[int]) -> PreferenceBatch:
        index = torch.as_tensor(indices)
        return make_batch(self.pairs, index, self.pi_ref)


def make_batch(pairs: TabularPairs, index: Tensor, pi_ref: Tensor) -> PreferenceBatch:
    """A batch whose KL samples enumerate every response of each pair's prompt, weighted by π_ref/N."""
    prompt = pairs.prompt[index]
    n, responses = len(index), pi_ref.shape[-1]
    ones = torch.ones(n)
    return PreferenceBatch(
        chosen={"prompt": prompt, "response": pairs.chosen[index]},
        rejected={"prompt": prompt, "response": pairs.rejected[index]},
        chosen_tokens=ones,
        rejected_tokens=ones,
        label=pairs.label[index],
        kl_samples={"prompt": prompt.repeat_interleave(responses), "response": torch.arange(responses).repeat(n)},
        kl_weights=(pi_ref[prompt] / n).flatten(),
    )


class _FullBatchDataset(Dataset[PreferenceBatch]):
    """The whole population as one batch, ``steps`` times an epoch."""

    def __init__(self, batch: PreferenceBatch, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> PreferenceBatch:
        return self.batch


class TabularPreferenceData(L.LightningDataModule):
    """Sampled pairs in mini-batches, in their drawn order or reshuffled each epoch, or the exact population as
    ``full_batch_steps`` full batches."""

    def __init__(
        self,
        pairs: TabularPairs,
        pi_ref: Tensor,
        batch_size: int,
        seed: int,
        full_batch_steps: int | None = None,
        reshuffle: bool = False,
    ) -> None:
        super().__init__()
        self.pairs, self.pi_ref, self.batch_size, self.seed = pairs, pi_ref, batch_size, seed
        self.full_batch_steps, self.reshuffle = full_batch_steps, reshuffle

    def train_dataloader(self) -> DataLoader[PreferenceBatch]:
        if self.full_batch_steps is not None:
            whole = make_batch(self.pairs, torch.arange(len(self.pairs)), self.pi_ref)
            return DataLoader(_FullBatchDataset(whole, self.full_batch_steps), batch_size=None)
        return DataLoader(
            TabularPairDataset(self.pairs, self.pi_ref),
            batch_size=self.batch_size,
            shuffle=self.reshuffle,
            generator=torch.Generator().manual_seed(self.seed) if self.reshuffle else None,
            collate_fn=whole_batch,
        )
