"""Tokenized preference pairs as a LightningDataModule, with cached reference log-probs attached."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from expo_bench.contracts import PreferenceBatch, SequenceScorer, concat_sequences
from expo_bench.distributed import map_sharded, rank, world_size
from expo_bench.lm.tokenize import TokenizedPair, collate_pairs, padded_sequences
from expo_bench.reporting import Done

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
        samples_per_epoch: int | None = None,
    ) -> None:
        self.pairs, self.pad_token_id = pairs, pad_token_id
        self.reference_logps, self.reference_samples = reference_logps, reference_samples
        self.reference_sample_logps = reference_sample_logps
        self.samples_per_epoch = samples_per_epoch
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


class InOrderSampler(Sampler[int]):
    """The data in order, dealt to the ranks in turn: rank r of W takes positions r, r + W, ... of :meth:`order`, so
    that W ranks with batches of b see, step by step, the pairs one process sees with batches of W·b. Shards are made
    equal by repeating the first positions, as torch's ``DistributedSampler`` does. (Lightning's own distributed
    sampler would shuffle the order again, differently for every world size: the Trainer is told not to add one.)"""

    def __init__(self, size: int) -> None:
        self.size, self.rank, self.world = size, rank(), world_size()

    def order(self) -> list[int]:
        return list(range(self.size))

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        order += order[: len(self) * self.world - len(order)]
        return iter(order[self.rank :: self.world])


class EpochSeededSampler(InOrderSampler):
    """A fresh permutation per epoch, a function of (seed, epoch) alone, so a run resumed from an
    end-of-epoch checkpoint sees the same order as one that never stopped (Lightning calls set_epoch, which
    the sampler passes on to its dataset: its reference samples may change with the epoch)."""

    def __init__(self, size: int, seed: int, on_epoch: Callable[[int], None] | None = None) -> None:
        super().__init__(size)
        self.seed, self.epoch, self.on_epoch = seed, 0, on_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return list(torch.randperm(self.size, generator=generator).tolist())


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


class LengthGroupedSampler(EpochSeededSampler):
    """The epoch's permutation cut into groups of ``group`` global batches (``batch_size × world size`` positions),
    each group sorted longest first, so that a batch holds pairs of similar lengths and pads less; the groups, and so
    the batches, stay in random order. Like the order, the grouping does not depend on the number of ranks."""

    def __init__(
        self, lengths: Sequence[int], seed: int, batch_size: int, group: int, on_epoch: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(len(lengths), seed, on_epoch)
        self.lengths, self.span = lengths, batch_size * self.world * group

    def order(self) -> list[int]:
        order = super().order()
        groups = [order[start : start + self.span] for start in range(0, len(order), self.span)]
        return [index for group in groups for index in sorted(group, key=lambda i: -self.lengths[i])]


class Sealed:
    """A batch as the data loader hands it to Lightning. A precision plugin's ``convert_input`` casts every float
    tensor of a batch to its compute dtype (and refuses frozen dataclasses): that would round the cached reference
    log-probs, the KL weights and the labels to 16 bits under ``bf16-true``, or under FSDP. It leaves this wrapper
    alone, and the modules' ``transfer_batch_to_device`` opens it with :meth:`to`."""

    def __init__(self, contents: PreferenceBatch) -> None:
        self.contents = contents

    def to(self, device: torch.device) -> PreferenceBatch:
        return self.contents.to(device)


def seal(batch: Any) -> Sealed:
    """``collate_fn`` for :class:`PairDataset`, whose ``__getitems__`` builds the whole batch."""
    return Sealed(batch)


def pair_length(pair: TokenizedPair) -> int:
    """The padded width a pair needs in a batch: its prompt and its longer response."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def loader(
    dataset: PairDataset, batch_size: int, shuffle: bool, seed: int, group_by_length: int | None = None
) -> DataLoader[PreferenceBatch]:
    # Its own generator: a DataLoader draws a worker seed from the global stream at every iter(), and a resumed run
    # starts one more iterator than an uninterrupted one, which would shift every later dropout mask.
    generator = torch.Generator().manual_seed(seed)
    if not shuffle:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=InOrderSampler(len(dataset)), collate_fn=seal, generator=generator
        )
    sampler = (
        LengthGroupedSampler([pair_length(pair) for pair in dataset.pairs], seed, batch_size, group_by_length, dataset.set_epoch)
        if group_by_length
        else EpochSeededSampler(len(dataset), seed, dataset.set_epoch)
    )
    batches = ResumableBatchSampler(sampler, batch_size, drop_last=False)
    return ResumableLoader(dataset, batch_sampler=batches, collate_fn=seal, generator=generator)


class PairData(L.LightningDataModule):
    """Training pairs (shuffled, seeded, optionally grouped by length) and held-out pairs (in order)."""

    def __init__(
        self, train: PairDataset, val: PairDataset, batch_size: int, seed: int, group_by_length: int | None = None
    ) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed
        self.group_by_length = group_by_length

    def train_dataloader(self) -> DataLoader[PreferenceBatch]:
        return loader(self.train, self.batch_size, shuffle=True, seed=self.seed, group_by_length=self.group_by_length)

    def val_dataloader(self) -> DataLoader[PreferenceBatch]:
        return loader(self.val, self.batch_size, shuffle=False, seed=self.seed)


def in_batches(dataset: PairDataset, batch_size: int) -> list[list[int]]:
    """The dataset's indices in order, cut into batches: the work units that ranks share for one-off passes."""
    return [list(range(start, min(start + batch_size, len(dataset)))) for start in range(0, len(dataset), batch_size)]


def reference_logps(
    reference: SequenceScorer, dataset: PairDataset, batch_size: int, device: torch.device, done: Done | None = None
) -> Tensor:
    """``(N, 2)`` summed log-probs of chosen and rejected under the reference, one pass over the data shared by the ranks
    (``done`` is told about how many pairs are scored after each batch)."""

    @torch.no_grad()
    def score(k: int, indices: list[int]) -> Tensor:
        batch = dataset.__getitems__(indices).to(device)
        both = reference.sequence_logps(concat_sequences(batch.chosen, batch.rejected)).float().cpu()
        if done is not None:  # the ranks advance together: when batch k is scored, so are about the first k + 1
            done(min(len(dataset), (k + 1) * batch_size))
        return torch.stack(both.chunk(2), dim=1)

    return torch.cat(map_sharded(in_batches(dataset, batch_size), score))


def reference_sample_logps(
    reference: SequenceScorer, dataset: PairDataset, batch_size: int, device: torch.device
) -> list[list[float]]:
    """For each pair, the reference log-prob of each of its reference samples (every epoch's), one pass shared by the
    ranks."""
    assert dataset.reference_samples is not None
    samples_of = dataset.reference_samples

    @torch.no_grad()
    def score(k: int, indices: list[int]) -> list[float]:
        prompts = [dataset.pairs[index].prompt_ids for index in indices for _ in samples_of[index]]
        samples = [sample for index in indices for sample in samples_of[index]]
        length = max(len(prompt) + len(sample) for prompt, sample in zip(prompts, samples, strict=True))
        sequences = padded_sequences(prompts, samples, length, dataset.pad_token_id)
        return reference.sequence_logps({key: value.to(device) for key, value in sequences.items()}).float().tolist()

    flat = [logp for part in map_sharded(in_batches(dataset, batch_size), score) for logp in part]
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
