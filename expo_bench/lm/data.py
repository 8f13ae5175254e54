"""Tokenized preference pairs as a LightningDataModule, with cached reference log-probs attached."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from expo_bench.contracts import PreferenceBatch, SequenceScorer, concat_sequences, whole_batch
from expo_bench.lm.tokenize import TokenizedPair, collate_pairs, padded_sequences
from expo_bench.reporting import Done


class PairDataset(Dataset[PreferenceBatch]):
    """Pairs that build whole batches, with what was computed once from the reference attached.

    ``reference_logps``: ``(N, 2)`` log-probs of (chosen, rejected). ``reference_samples``: for each pair,
    responses sampled from the reference for its prompt: a batch then carries them as KL samples, each
    weighted 1 / (batch pairs × samples per prompt); ``reference_sample_logps``: their reference log-probs.
    """

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        pad_token_id: int,
        reference_logps: Tensor | None = None,
        reference_samples: Sequence[list[list[int]]] | None = None,
        reference_sample_logps: Sequence[list[float]] | None = None,
    ) -> None:
        self.pairs, self.pad_token_id = pairs, pad_token_id
        self.reference_logps, self.reference_samples = reference_logps, reference_samples
        self.reference_sample_logps = reference_sample_logps

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, indices: list[int]) -> PreferenceBatch:
        batch = collate_pairs([self.pairs[index] for index in indices], self.pad_token_id)
        if self.reference_logps is not None:
            cached = self.reference_logps[indices]
            batch = replace(batch, reference_chosen_logps=cached[:, 0], reference_rejected_logps=cached[:, 1])
        if self.reference_samples is not None:
            prompts = [self.pairs[index].prompt_ids for index in indices for _ in self.reference_samples[index]]
            samples = [sample for index in indices for sample in self.reference_samples[index]]
            length = max(len(prompt) + len(sample) for prompt, sample in zip(prompts, samples, strict=True))
            kl_samples = padded_sequences(prompts, samples, length, self.pad_token_id)
            batch = replace(batch, kl_samples=kl_samples, kl_weights=torch.full((len(samples),), 1 / len(samples)))
            if self.reference_sample_logps is not None:
                logps = [logp for index in indices for logp in self.reference_sample_logps[index]]
                batch = replace(batch, kl_reference_logps=torch.tensor(logps))
        return batch


class EpochSeededSampler(Sampler[int]):
    """A fresh permutation per epoch, a function of (seed, epoch) alone, so a run resumed from an
    end-of-epoch checkpoint sees the same order as one that never stopped (Lightning calls set_epoch)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def loader(dataset: PairDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader[PreferenceBatch]:
    sampler = EpochSeededSampler(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=whole_batch)


class PairData(L.LightningDataModule):
    """Training pairs (shuffled, seeded) and held-out pairs (in order)."""

    def __init__(self, train: PairDataset, val: PairDataset, batch_size: int, seed: int) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed

    def train_dataloader(self) -> DataLoader[PreferenceBatch]:
        return loader(self.train, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader[PreferenceBatch]:
        return loader(self.val, self.batch_size, shuffle=False, seed=self.seed)


@torch.no_grad()
def reference_logps(
    reference: SequenceScorer, dataset: PairDataset, batch_size: int, device: torch.device, done: Done | None = None
) -> Tensor:
    """``(N, 2)`` summed log-probs of chosen and rejected under the reference, one pass over the data (``done`` is told
    how many pairs are scored after each batch)."""
    rows: list[Tensor] = []
    for batch in loader(dataset, batch_size, shuffle=False, seed=0):
        batch = batch.to(device)
        both = reference.sequence_logps(concat_sequences(batch.chosen, batch.rejected)).float().cpu()
        rows.append(torch.stack(both.chunk(2), dim=1))
        if done is not None:
            done(sum(len(row) for row in rows))
    return torch.cat(rows)


@torch.no_grad()
def reference_sample_logps(
    reference: SequenceScorer, dataset: PairDataset, batch_size: int, device: torch.device
) -> list[list[float]]:
    """For each pair, the reference log-prob of each of its reference samples, one pass over the data."""
    assert dataset.reference_samples is not None
    flat: list[float] = []
    for batch in loader(dataset, batch_size, shuffle=False, seed=0):
        assert batch.kl_samples is not None
        flat += reference.sequence_logps({key: value.to(device) for key, value in batch.kl_samples.items()}).float().tolist()
    per_pair, start = [], 0
    for samples in dataset.reference_samples:
        per_pair.append(flat[start : start + len(samples)])
        start += len(samples)
    return per_pair


def fingerprint_pairs(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 over every token id of every pair: equal only for the same data, tokenizer and truncation."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:16]


def fingerprint_module(module: torch.nn.Module) -> str:
    """sha256 over the module's weights: the reference cache key must change whenever the weights do."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
