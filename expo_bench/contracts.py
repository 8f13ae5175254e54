"""The small typed contracts at which data, models and methods meet.

Shapes: ``N`` is the number of sequences in a batch. Per-sequence log-probs may carry leading
replica dimensions (``(..., N)``): the tabular task trains a grid of λ values as independent replicas
of one policy, and every loss is elementwise, so the same code serves one model or many.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import torch
from torch import Tensor

Sequences = dict[str, Tensor]
"""Model inputs for ``N`` sequences (e.g. prompt/response ids); every tensor has leading dim ``N``."""


def concat_sequences(first: Sequences, second: Sequences) -> Sequences:
    """Stack two sequence batches so chosen and rejected go through the model in one forward pass."""
    return {key: torch.cat([first[key], second[key]]) for key in first}


class SequenceScorer(Protocol):
    """A policy or reference: summed log-probability of each response given its prompt."""

    def sequence_logps(self, sequences: Sequences) -> Tensor:
        """Return ``(..., N)`` log π(y | x) summed over response tokens."""
        ...


class Policy(SequenceScorer, Protocol):
    """A trainable scorer that also reports how spread out its next-token distributions are."""

    def response_entropy(self, sequences: Sequences) -> Tensor:
        """``(..., N)`` mean entropy of π(· | x, y_<t) over the response positions t, without gradients."""
        ...


@dataclass(frozen=True)
class PreferenceBatch:
    """``N`` preference pairs (x, y_w, y_l) with label z = P(y_w ≻ y_l).

    ``reference_*_logps`` carry cached reference log-probs when the data provides them.
    ``kl_samples``/``kl_weights`` carry responses y ~ π_ref(·|x) (weights summing to 1 over the batch)
    for methods that estimate KL(π_ref ‖ π) on them (EXPO-compositional), and ``kl_reference_logps``
    their reference log-probs where those were computed once.
    """

    chosen: Sequences
    rejected: Sequences
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    label: Tensor
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None
    kl_samples: Sequences | None = None
    kl_weights: Tensor | None = None
    kl_reference_logps: Tensor | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str) -> PreferenceBatch:
        def move(value: Tensor | Sequences | None) -> Tensor | Sequences | None:
            if isinstance(value, dict):
                return {key: tensor.to(device) for key, tensor in value.items()}
            return None if value is None else value.to(device)

        moved: dict[str, Any] = {field.name: move(getattr(self, field.name)) for field in fields(self)}
        return PreferenceBatch(**moved)


def whole_batch(batch: Any) -> Any:
    """``collate_fn`` for datasets whose ``__getitems__`` already builds the whole batch."""
    return batch


@dataclass(frozen=True)
class SampleLogps:
    """Summed log-probs of responses y_m ~ π_ref(·|x) that a batch carries (``kl_samples``), with their weights
    (summing to 1 over the batch): what an estimate of KL(π_ref ‖ π) = E[log π_ref(y) − log π(y)] needs."""

    policy: Tensor
    """``(..., M)`` log π(y_m), with gradients."""
    reference: Tensor
    """``(M,)`` log π_ref(y_m)."""
    weights: Tensor
    """``(M,)``."""

    def kl(self) -> Tensor:
        """Σ_m w_m (log π_ref(y_m) − log π(y_m)): ``(..., 1)``."""
        return ((self.reference - self.policy) * self.weights).sum(-1, keepdim=True)


@dataclass(frozen=True)
class PairLogps:
    """Per-sequence log-probs of a batch of pairs, in float32, as a method's loss reads them.

    With ``length_normalized`` (a method modifier) the pair log-probs are per-token means instead of sums.
    ``reference_*`` is ``None`` for reference-free methods; ``samples`` is set for methods that estimate
    KL(π_ref ‖ π) on reference samples (always summed log-probs: the KL is over whole responses).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor | None
    reference_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    length_normalized: bool = False
    samples: SampleLogps | None = None

    @property
    def policy_margin(self) -> Tensor:
        """d_pol = log π(y_w) - log π(y_l)."""
        return self.policy_chosen - self.policy_rejected

    @property
    def reference_margin(self) -> Tensor:
        """d_ref = log π_ref(y_w) - log π_ref(y_l)."""
        if self.reference_chosen is None or self.reference_rejected is None:
            raise ValueError("reference log-probs are missing: this method needs a reference model")
        return self.reference_chosen - self.reference_rejected

    @property
    def log_ratio_margin(self) -> Tensor:
        """h = d_pol - d_ref."""
        return self.policy_margin - self.reference_margin

    @property
    def chosen_token_mean(self) -> Tensor:
        """log π(y_w) / |y_w|, whether or not the pair log-probs are length-normalized (an empty response counts as
        one token)."""
        return self.policy_chosen if self.length_normalized else self.policy_chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_token_mean(self) -> Tensor:
        """log π(y_l) / |y_l|, as :attr:`chosen_token_mean`."""
        return self.policy_rejected if self.length_normalized else self.policy_rejected / self.rejected_tokens.clamp(min=1)

    def normalized(self) -> PairLogps:
        """Per-token means; an empty response counts as one token so nothing divides by zero."""
        if self.length_normalized:
            return self
        chosen, rejected = self.chosen_tokens.clamp(min=1), self.rejected_tokens.clamp(min=1)
        return replace(
            self,
            policy_chosen=self.policy_chosen / chosen,
            policy_rejected=self.policy_rejected / rejected,
            reference_chosen=None if self.reference_chosen is None else self.reference_chosen / chosen,
            reference_rejected=None if self.reference_rejected is None else self.reference_rejected / rejected,
            length_normalized=True,
        )
