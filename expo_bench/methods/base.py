"""The base LightningModule every preference-optimization method derives from.

A method file holds a pure loss function over per-sequence log-probs and a small subclass of
:class:`PreferenceMethod` that names its ``Params`` and returns its objective's terms. The base does the
rest the same way for every method: one concatenated policy forward pass for chosen and rejected, the
reference log-probs (cached in the batch, or computed without gradients), the SimPO-style modifiers
(length normalization, margin ``gamma``), optimization, gradient clipping and logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from pydantic import Field
from torch import Tensor, nn

from expo_bench.config_model import ConfigModel
from expo_bench.contracts import PairLogps, PreferenceBatch, Sequences, SequenceScorer, concat_sequences
from expo_bench.optim import OptimizerConfig

REGISTRY: dict[str, type[PreferenceMethod]] = {}
"""Built-in methods by name; filled as each module under ``expo_bench.methods`` is imported."""


class MethodParams(ConfigModel):
    """Hyperparameters every method takes: the SimPO-style modifiers.

    ``gamma`` is an absolute margin subtracted from the preference logit of the winning response
    (SimPO's γ; the SimPO repo's ``gamma_beta_ratio`` is γ/β, TRL's ``simpo_gamma`` is γ).
    ``length_normalize`` replaces summed log-probs by per-token means (SimPO; IPO's per-token option).
    """

    gamma: float = Field(0.0, ge=0)
    length_normalize: bool = False


def preference_nll(logit: Tensor, label: Tensor | float, gamma: float | Tensor = 0.0) -> Tensor:
    """Bradley–Terry negative log-likelihood of soft label z = P(y_w ≻ y_l), with margin γ.

    ``-(z·log σ(s - γ) + (1 - z)·log σ(-s - γ))``: the margin applies to whichever response the label
    declares the winner, so a flipped pair with flipped label gives the same loss.
    """
    return -(label * F.logsigmoid(logit - gamma) + (1 - label) * F.logsigmoid(-logit - gamma))


class PreferenceMethod(L.LightningModule):
    """A preference-optimization method as a LightningModule.

    ``policy`` is a module implementing :class:`~expo_bench.contracts.Policy`, ``reference`` a
    :class:`~expo_bench.contracts.SequenceScorer` (or ``None`` for reference-free methods).
    ``params`` is one :class:`MethodParams` per replica. A single language model has one replica;
    the tabular task trains a λ-grid as replicas of one policy whose parameters carry a leading replica
    dimension. Hyperparameters that differ across replicas become ``(G, 1)`` tensors that broadcast
    against ``(G, N)`` log-probs, and gradients are clipped per replica, so each replica follows exactly
    the trajectory it would follow alone.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    regularization: ClassVar[str | None] = None
    """Name of the field that plays the paper's λ (DPO's β, IPO's τ), or ``None`` (reference-free)."""
    reference_free: ClassVar[bool] = False

    @classmethod
    def requires(cls, params: MethodParams) -> frozenset[str]:
        """Optional batch fields (e.g. ``kl_samples``) these hyperparameters need from the task's data."""
        return frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.__module__.startswith("expo_bench.methods."):
            REGISTRY[cls.name] = cls

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        params: Sequence[MethodParams],
        optimizer: OptimizerConfig,
    ) -> None:
        super().__init__()
        if not params:
            raise ValueError("a method needs at least one set of hyperparameters")
        if reference is None and not self.reference_free:
            raise ValueError(f"{type(self).__name__} needs a reference model")
        self.policy = policy.train()  # Hugging Face models load in eval mode
        self.reference = None if self.reference_free else reference
        if self.reference is not None:
            self.reference.requires_grad_(False).eval()
        self.params = params[0]
        self.replicas = len(params)
        self.optimizer_config = optimizer
        self._varying: dict[str, Tensor] = {}
        for field in type(self.params).model_fields:
            values = [getattr(p, field) for p in params]
            if any(value != values[0] for value in values):
                if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
                    raise ValueError(f"only numeric hyperparameters may differ across replicas, not {field!r}")
                self.register_buffer(f"_hp_{field}", torch.tensor(values, dtype=torch.float32)[:, None])
                self._varying[field] = getattr(self, f"_hp_{field}")

    def train(self, mode: bool = True) -> PreferenceMethod:
        """Lightning toggles modes around validation; the frozen reference stays in eval mode (no dropout)."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def hp(self, field: str) -> Any:
        """Hyperparameter ``field``: a float, or a ``(G, 1)`` tensor where it differs across replicas."""
        return getattr(self, f"_hp_{field}") if field in self._varying else getattr(self.params, field)

    # -- the contract a method implements ---------------------------------------------------------

    def objective(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        """Named terms of the loss, each reduced over the batch (shape ``(...,)``); the loss is their sum."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------------

    def scores(self, model: SequenceScorer, sequences: Sequences) -> Tensor:
        return model.sequence_logps(sequences).float()

    def reference_scores(self, sequences: Sequences) -> Tensor:
        if self.reference is None:
            raise ValueError(f"{type(self).__name__} is reference-free and has no reference model")
        with torch.no_grad():
            return self.scores(self.reference, sequences)  # type: ignore[arg-type]

    def pair_logps(self, batch: PreferenceBatch) -> PairLogps:
        """Per-sequence log-probs as the loss sees them (summed, or per-token means)."""
        n = len(batch)
        both = self.scores(self.policy, concat_sequences(batch.chosen, batch.rejected))  # type: ignore[arg-type]
        policy_chosen, policy_rejected = both[..., :n], both[..., n:]
        reference_chosen = reference_rejected = None
        if not self.reference_free:
            if batch.reference_chosen_logps is not None and batch.reference_rejected_logps is not None:
                reference_chosen = batch.reference_chosen_logps.float()
                reference_rejected = batch.reference_rejected_logps.float()
            else:
                reference_both = self.reference_scores(concat_sequences(batch.chosen, batch.rejected))
                reference_chosen, reference_rejected = reference_both[..., :n], reference_both[..., n:]
        logps = PairLogps(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
        return length_normalized(logps, batch) if self.params.length_normalize else logps

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        logps = self.pair_logps(batch)
        terms = self.objective(logps, batch)
        per_replica = torch.stack(list(terms.values())).sum(0)
        # Lightning's log() costs more than a tabular step; call it only on the steps a logger would keep.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            metrics = pair_metrics("train", logps, terms)
            metrics["train/entropy"] = self.policy.response_entropy(concat_sequences(batch.chosen, batch.rejected)).mean()  # type: ignore[operator]
            self.log_dict(metrics, batch_size=len(batch), sync_dist=True)
        # Summing over replicas keeps each replica's gradient what it would be if trained alone.
        return per_replica.sum()

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        logps = self.pair_logps(batch)
        metrics = pair_metrics("val", logps, self.objective(logps, batch))
        self.log_dict(metrics, batch_size=len(batch), sync_dist=True, on_epoch=True)

    def transfer_batch_to_device(self, batch: PreferenceBatch, device: torch.device, dataloader_idx: int) -> PreferenceBatch:
        return batch.to(device)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        return self.optimizer_config.build(p for p in self.policy.parameters() if p.requires_grad)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.replicas == 1 or gradient_clip_val is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        clip_per_replica([p for p in self.policy.parameters() if p.grad is not None], gradient_clip_val)


def pair_metrics(stage: str, logps: PairLogps, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss, its terms, mean log-probs and, with a reference, implicit rewards log π/π_ref (unscaled by β,
    so methods compare on one scale). An accuracy counts h > 0 as 1 and a tie h = 0 as ½, averaged over
    pairs (and replicas)."""
    metrics = {f"{stage}/loss": torch.stack(list(terms.values())).sum(0).mean()}
    if len(terms) > 1:
        metrics |= {f"{stage}/loss_{name}": value.mean() for name, value in terms.items()}
    metrics |= {f"{stage}/logps_chosen": logps.policy_chosen.mean(), f"{stage}/logps_rejected": logps.policy_rejected.mean()}
    if logps.reference_chosen is not None and logps.reference_rejected is not None:
        margin = logps.log_ratio_margin
        metrics |= {
            f"{stage}/rewards_chosen": (logps.policy_chosen - logps.reference_chosen).mean(),
            f"{stage}/rewards_rejected": (logps.policy_rejected - logps.reference_rejected).mean(),
            f"{stage}/rewards_margin": margin.mean(),
            f"{stage}/rewards_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
        }
    policy_margin = logps.policy_margin
    metrics[f"{stage}/preference_accuracy"] = ((policy_margin > 0).float() + 0.5 * (policy_margin == 0).float()).mean()
    return {name: value.detach() for name, value in metrics.items()}


def length_normalized(logps: PairLogps, batch: PreferenceBatch) -> PairLogps:
    """Per-token mean log-probs; an empty response counts as one token so nothing divides by zero."""
    chosen_tokens = batch.chosen_tokens.clamp(min=1).float()
    rejected_tokens = batch.rejected_tokens.clamp(min=1).float()
    return PairLogps(
        logps.policy_chosen / chosen_tokens,
        logps.policy_rejected / rejected_tokens,
        None if logps.reference_chosen is None else logps.reference_chosen / chosen_tokens,
        None if logps.reference_rejected is None else logps.reference_rejected / rejected_tokens,
    )


def clip_per_replica(parameters: list[nn.Parameter], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each replica (leading dim) on its own."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.view(-1, *([1] * (grad.dim() - 1))))
