"""Tokenized preference pairs as a LightningDataModule, with cached reference log-probs attached."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from expo_bench.contracts import PreferenceBatch, SequenceScorer, concat_sequences, whole_batch
from expo_bench.lm.tokenize import TokenizedPair, collate_pairs, padded_sequences

T = TypeVar("T")


class PairDataset(Dataset[PreferenceBatch]):
    """Pairs that build whole batches, with what was computed once from the reference attached.

    ``reference_logps``: ``(N, 2)`` log-probs of (chosen, rejected). ``reference_samples``: for each pair,
    responses sampled from the reference for its prompt: a batch then carries them as KL samples, each
    weighted 1 / (batch pairs × samples per prompt); ``reference_sample_logps``: their reference log-probs.
    With ``samples_per_epoch`` each pair holds several epochs' worth of samples and epoch e uses its e-th slice
    (cycling), so the KL is estimated on fresh draws from π_ref every epoch.
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
        self.samples_per_epoch: int | None = None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _this_epoch(self, values: Sequence[T]) -> Sequence[T]:
        """The slice of a pair's samples (or their log-probs) that belongs to the current epoch."""
        if self.samples_per_epoch is None:
            return values
        slices = len(values) // self.samples_per_epoch
        start = (self.epoch % slices) * self.samples_per_epoch
        return values[start : start + self.samples_per_epoch]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, indices: list[int]) -> PreferenceBatch:
        batch = collate_pairs([self.pairs[index] for index in indices], self.pad_token_id)
        if self.reference_logps is not None:
            cached = self.reference_logps[indices]
            batch = replace(batch, reference_chosen_logps=cached[:, 0], reference_rejected_logps=cached[:, 1])
        if self.reference_samples is not None:
            drawn = [self._this_epoch(self.reference_samples[index]) for index in indices]
            prompts = [self.pairs[index].prompt_ids for index, group in zip(indices, drawn, strict=True) for _ in group]
            samples = [sample for group in drawn for sample in group]
            length = max(len(prompt) + len(sample) for prompt, sample in zip(prompts, samples, strict=True))
            kl_samples = padded_sequences(prompts, samples, length, self.pad_token_id)
            batch = replace(batch, kl_samples=kl_samples, kl_weights=torch.full((len(samples),), 1 / len(samples)))
            if self.reference_sample_logps is not None:
                logps = [logp for index in indices for logp in self._this_epoch(self.reference_sample_logps[index])]
                batch = replace(batch, kl_reference_logps=torch.tensor(logps))
        return batch


class EpochSeededSampler(Sampler[int]):
    """A fresh permutation per epoch, a function of (seed, epoch) alone, so a run resumed from an
    end-of-epoch checkpoint sees the same order as one that never stopped (Lightning calls set_epoch, which
    the sampler passes on to its dataset: its reference samples may change with the epoch)."""

    def __init__(self, size: int, seed: int, on_epoch: Callable[[int], None] | None = None) -> None:
        self.size, self.seed, self.epoch, self.on_epoch = size, seed, 0, on_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableBatchSampler(BatchSampler):
    """Batches of its sampler's indices that can start part-way through an epoch.

    It counts the batches it handed out in the current epoch; told on resume that ``start`` batches of epoch ``epoch``
    were trained, it skips exactly those (as indices: no data is loaded for them) when it next iterates that epoch.
    Skipping whole batches of the sampler's own stream also holds under a distributed sampler wrapper, whose per-rank
    stream is a function of the epoch too.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.drawn = 0
        self.resume: tuple[int, int] | None = None  # (epoch, batches already trained)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.drawn = self.epoch, 0
        start = self.resume[1] if self.resume is not None and self.resume[0] == epoch else 0
        self.resume = None
        for batch in itertools.islice(super().__iter__(), start, None):
            self.drawn = start = start + 1
            yield batch


class ResumableLoader(DataLoader[PreferenceBatch]):
    """A DataLoader that Lightning can resume mid-epoch: it saves :meth:`state_dict` in every checkpoint and calls
    :meth:`load_state_dict` before the resumed epoch's first batch (``fit_loop`` treats any loader with both as stateful).

    The count is exact because the batches are built in the main process (no worker prefetches indices) and Lightning
    does not prefetch from a loader with a length: at a checkpoint, every batch drawn has been trained.
    """

    batch_sampler: ResumableBatchSampler

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches": self.batch_sampler.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume = (int(state["epoch"]), int(state["batches"]))


def loader(dataset: PairDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader[PreferenceBatch]:
    # Its own generator: a DataLoader draws a worker seed from the global stream at every iter(), and a resumed run
    # starts one more iterator than an uninterrupted one, which would shift every later dropout mask.
    generator = torch.Generator().manual_seed(seed)
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=whole_batch, generator=generator)
    batches = ResumableBatchSampler(EpochSeededSampler(len(dataset), seed, dataset.set_epoch), batch_size, drop_last=False)
    return ResumableLoader(dataset, batch_sampler=batches, collate_fn=whole_batch, generator=generator)


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
def reference_logps(reference: SequenceScorer, dataset: PairDataset, batch_size: int, device: torch.device) -> Tensor:
    """``(N, 2)`` summed log-probs of chosen and rejected under the reference, one pass over the data."""
    rows = []
    for batch in loader(dataset, batch_size, shuffle=False, seed=0):
        batch = batch.to(device)
        both = reference.sequence_logps(concat_sequences(batch.chosen, batch.rejected)).float().cpu()
        rows.append(torch.stack(both.chunk(2), dim=1))
    return torch.cat(rows)


@torch.no_grad()
def reference_sample_logps(
    reference: SequenceScorer, dataset: PairDataset, batch_size: int, device: torch.device
) -> list[list[float]]:
    """For each pair, the reference log-prob of each of its reference samples (every epoch's), one pass over the data."""
    assert dataset.reference_samples is not None
    flat: list[float] = []
    for start in range(0, len(dataset), batch_size):
        pairs = range(start, min(start + batch_size, len(dataset)))
        prompts = [dataset.pairs[index].prompt_ids for index in pairs for _ in dataset.reference_samples[index]]
        samples = [sample for index in pairs for sample in dataset.reference_samples[index]]
        length = max(len(prompt) + len(sample) for prompt, sample in zip(prompts, samples, strict=True))
        sequences = padded_sequences(prompts, samples, length, dataset.pad_token_id)
        flat += reference.sequence_logps({key: value.to(device) for key, value in sequences.items()}).float().tolist()
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
