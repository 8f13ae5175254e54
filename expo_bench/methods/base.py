"""The base LightningModule every preference-optimization method derives from.

A method file holds its loss as pure functions and a small subclass of :class:`PreferenceMethod`. A pairwise
method gives its preference logit s (DPO: βh) and its link loss ℓ (Bradley–Terry: −log σ); the base then
evaluates, for a pair with label z = P(y_w ≻ y_l) and margin γ,

    z·ℓ(s − γ) + (1 − z)·ℓ(−s − γ)

so the SimPO-style margin γ, soft labels and the symmetry "a flipped pair with a flipped label has the same loss"
hold for every such method by construction. A method may regress onto another target than z (cDPO,
EXPO-regression) and add regularizers (EXPO's λ·KL(π_ref ‖ π)). The base also does the single concatenated policy
forward pass, the reference log-probs (cached in the batch, or computed without gradients), the log-probs of
reference samples for methods that estimate a KL on them, length normalization, optimization, gradient
clipping (per replica, and across ranks under FSDP) and logging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from expo_bench import metric_keys as keys
from expo_bench.config_model import ConfigModel
from expo_bench.contracts import PairLogps, PreferenceBatch, SampleLogps, Sequences, SequenceScorer, concat_sequences
from expo_bench.optim import OptimizerConfig, clip_gradient_norm

if TYPE_CHECKING:
    from lightning import LightningModule
    from lightning.pytorch.utilities.types import OptimizerLRScheduler
else:

    class LightningModule:
        """Lightning's base is attached on instantiation: see PreferenceMethod.__new__."""


REGISTRY: dict[str, type[PreferenceMethod]] = {}
"""Built-in methods by name; filled as each module under ``expo_bench.methods`` is imported."""

KL_SAMPLES = "kl_samples"
"""A batch field a method may require (:meth:`PreferenceMethod.requires`): responses sampled from the reference."""


class MethodParams(ConfigModel):
    """Hyperparameters every method takes: the SimPO-style modifiers.

    ``gamma`` is an absolute margin subtracted from the preference logit of the winning response
    (SimPO's γ; the SimPO repo's ``gamma_beta_ratio`` is γ/β, TRL's ``simpo_gamma`` is γ).
    ``length_normalize`` replaces summed log-probs by per-token means (SimPO; IPO's per-token option).
    """

    gamma: float = Field(0.0, ge=0)
    length_normalize: bool = False


ParamsT = TypeVar("ParamsT", bound=MethodParams)
"""A method's own hyperparameter class: ``class DPO(PreferenceMethod[DPOParams])`` types ``self.params``."""


class DivergedError(RuntimeError):
    """Training reached a non-finite loss term or weights: the run stops and is recorded as failed, never as a result."""


def require_finite_weights(module: PreferenceMethod) -> None:
    """:class:`DivergedError` naming the method, the step and the first non-finite weight tensor of the policy."""
    bad = [name for name, parameter in module.policy.named_parameters() if not bool(torch.isfinite(parameter).all())]
    if bad:
        raise DivergedError(
            f"{module.method_name}: non-finite policy weights after optimizer step {module.global_step} "
            f"({len(bad)} tensors, the first {bad[0]}); lower the learning rate or check the hyperparameters"
        )


def bradley_terry(logit: Tensor) -> Tensor:
    """ℓ(u) = −log σ(u): the negative log-likelihood of the winner under Bradley–Terry."""
    return -F.logsigmoid(logit)


def pairwise_loss(link: Callable[[Tensor], Tensor], logit: Tensor, label: Tensor | float, gamma: float | Tensor = 0.0) -> Tensor:
    """``z·ℓ(s − γ) + (1 − z)·ℓ(−s − γ)``: the margin applies to whichever response the label declares the winner."""
    return label * link(logit - gamma) + (1 - label) * link(-logit - gamma)


def preference_nll(logit: Tensor, label: Tensor | float, gamma: float | Tensor = 0.0) -> Tensor:
    """Bradley–Terry negative log-likelihood of soft label z = P(y_w ≻ y_l), with margin γ:
    ``-(z·log σ(s - γ) + (1 - z)·log σ(-s - γ))``."""
    return pairwise_loss(bradley_terry, logit, label, gamma)


TRAINABLE = "Trainable"
_TRAINABLE_CLASSES: dict[type, type[PreferenceMethod]] = {}


def trainable(cls: type[PreferenceMethod]) -> type[PreferenceMethod]:
    """``cls`` as a Lightning ``LightningModule``: ``cls`` with Lightning's base class after its own bases, made once."""
    from lightning import LightningModule

    if issubclass(cls, LightningModule):
        return cls
    if cls not in _TRAINABLE_CLASSES:
        namespace = {"__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}.{TRAINABLE}", "__doc__": cls.__doc__}
        _TRAINABLE_CLASSES[cls] = type(cls.__name__, (cls, LightningModule), namespace)
    return _TRAINABLE_CLASSES[cls]


class _Trainable:
    """``Method.Trainable`` is :func:`trainable` of ``Method``, so pickle finds the class of an instance by name."""

    def __get__(self, instance: object, owner: type[PreferenceMethod]) -> type[PreferenceMethod]:
        return trainable(owner)


class PreferenceMethod(LightningModule, Generic[ParamsT]):
    """A preference-optimization method as a LightningModule.

    ``policy`` is a module implementing :class:`~expo_bench.contracts.Policy`, ``reference`` a
    :class:`~expo_bench.contracts.SequenceScorer` (or ``None`` for reference-free methods).
    ``params`` is one :class:`MethodParams` per replica. A single language model has one replica;
    the tabular task trains a λ-grid as replicas of one policy whose parameters carry a leading replica
    dimension. Hyperparameters that differ across replicas become ``(G, 1)`` tensors that broadcast
    against ``(G, N)`` log-probs, and gradients are clipped per replica, so each replica follows exactly
    the trajectory it would follow alone.

    A method class is declared without importing Lightning (about 6 s), so that recipes validate and
    ``expo-bench methods`` lists the methods in a moment; instantiating one gives an instance of its
    :func:`trainable` subclass, a ``LightningModule`` (``isinstance(module, Method)`` holds).
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    regularization: ClassVar[str | None] = None
    """Name of the field that plays the paper's λ (DPO's β, IPO's τ), or ``None`` (nothing to sweep)."""
    reference_free: ClassVar[bool] = False
    pair_term: ClassVar[str] = keys.LOSS
    """The name under which the pairwise term is logged when there are regularizers too."""
    takes_margin: ClassVar[bool] = True
    """Whether ``gamma`` reaches the loss: true for every method that keeps the base's pairwise :meth:`objective`;
    a method that overrides it is refused a nonzero ``gamma`` at validation."""

    @classmethod
    def requires(cls, params: ParamsT) -> frozenset[str]:
        """Optional batch fields (e.g. ``kl_samples``) these hyperparameters need from the task's data."""
        return frozenset()

    Trainable: ClassVar[Any] = _Trainable()

    def __new__(cls, *args: Any, **kwargs: Any) -> PreferenceMethod:
        return super().__new__(trainable(cls))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.takes_margin = cls.objective is PreferenceMethod.objective
        if "name" in cls.__dict__ and cls.__module__.startswith("expo_bench.methods."):
            taken = REGISTRY.get(cls.name)
            if taken is not None and taken is not cls:
                raise TypeError(f"method name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is taken by {taken.__module__}")
            REGISTRY[cls.name] = cls

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        params: Sequence[ParamsT],
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
        self.params: ParamsT = params[0]
        self.replicas = len(params)
        self.optimizer_config = optimizer
        self._needs_samples = KL_SAMPLES in self.requires(self.params)
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

    @property
    def method_name(self) -> str:
        return getattr(type(self), "name", type(self).__qualname__)

    def hp(self, field: str) -> Any:
        """Hyperparameter ``field``: a float, or a ``(G, 1)`` tensor where it differs across replicas."""
        return getattr(self, f"_hp_{field}") if field in self._varying else getattr(self.params, field)

    # -- what a pairwise method implements ---------------------------------------------------------

    def preference_logit(self, logps: PairLogps) -> Tensor:
        """s: how strongly the loss reads the policy as preferring y_w to y_l, ``(..., N)``."""
        raise NotImplementedError(f"{type(self).__name__} must define preference_logit() or override objective()")

    def link(self, logit: Tensor) -> Tensor:
        """ℓ(u): the loss of ranking the labelled winner ahead by logit u (default: Bradley–Terry, −log σ(u))."""
        return bradley_terry(logit)

    def target(self, logps: PairLogps, batch: PreferenceBatch) -> Tensor | float:
        """The probability that y_w wins which the loss regresses onto (default: the label z)."""
        return batch.label

    def regularizers(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        """Named terms added to the pairwise loss, each reduced over the batch (shape ``(...,)``)."""
        return {}

    def objective(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        """Named terms of the loss, each reduced over the batch (shape ``(...,)``); the loss is their sum."""
        loss = pairwise_loss(self.link, self.preference_logit(logps), self.target(logps, batch), self.hp("gamma"))
        return {self.pair_term: loss.mean(-1), **self.regularizers(logps, batch)}

    # -- shared machinery --------------------------------------------------------------------------

    def scores(self, model: SequenceScorer, sequences: Sequences) -> Tensor:
        return model.sequence_logps(sequences).float()

    def reference_scores(self, sequences: Sequences) -> Tensor:
        if self.reference is None:
            raise ValueError(f"{type(self).__name__} is reference-free and has no reference model")
        with torch.no_grad():
            return self.scores(self.reference, sequences)  # type: ignore[arg-type]

    def pair_logps(self, batch: PreferenceBatch) -> PairLogps:
        """Per-sequence log-probs as the loss sees them (summed, or per-token means), with reference samples'
        log-probs when the method estimates a KL on them."""
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
        logps = PairLogps(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            batch.chosen_tokens.float(),
            batch.rejected_tokens.float(),
            samples=self._sample_logps(batch) if self._needs_samples else None,
        )
        return logps.normalized() if self.params.length_normalize else logps

    def _sample_logps(self, batch: PreferenceBatch) -> SampleLogps:
        if batch.kl_samples is None or batch.kl_weights is None:
            raise ValueError(f"{type(self).__name__} needs reference samples in the batch (kl_samples)")
        policy = self.scores(self.policy, batch.kl_samples)  # type: ignore[arg-type]
        cached = batch.kl_reference_logps
        reference = self.reference_scores(batch.kl_samples) if cached is None else cached.float()
        return SampleLogps(policy, reference, batch.kl_weights.float())

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        logps = self.pair_logps(batch)
        terms = self.objective(logps, batch)
        self._require_finite(terms)
        per_replica = torch.stack(list(terms.values())).sum(0)
        if self._logging_step():
            metrics = pair_metrics(keys.TRAIN, logps, terms)
            entropy = self.policy.response_entropy(concat_sequences(batch.chosen, batch.rejected))  # type: ignore[operator]
            metrics[keys.stage_key(keys.TRAIN, keys.ENTROPY)] = entropy.mean()
            self.log_dict(metrics, batch_size=len(batch), sync_dist=True)
        # Summing over replicas keeps each replica's gradient what it would be if trained alone.
        return per_replica.sum()

    def _logging_step(self) -> bool:
        """Whether a logger keeps this step's values: Lightning's log() costs more than a tabular step."""
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0  # type: ignore[attr-defined]

    def _require_finite(self, terms: dict[str, Tensor]) -> None:
        """Stop at the first non-finite loss term (one host sync per step; every rank takes the same decision)."""
        finite = torch.stack([torch.isfinite(value.detach()).all() for value in terms.values()]).tolist()
        if self.trainer.strategy.reduce_boolean_decision(all(finite), all=True):
            return
        values = ", ".join(f"{name} = {value.detach().float().mean():.4g}" for name, value in terms.items())
        bad = [name for name, ok in zip(terms, finite, strict=True) if not ok]
        raise DivergedError(
            f"{self.method_name}: non-finite loss term {', '.join(bad) or '(on another rank)'} at optimizer step "
            f"{self.global_step + 1} ({values}); lower the learning rate or check the hyperparameters"
        )

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        logps = self.pair_logps(batch)
        metrics = pair_metrics(keys.VAL, logps, self.objective(logps, batch))
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
        """Norm clipping that is right under every strategy (:func:`~expo_bench.optim.clip_gradient_norm`; each replica
        on its own where there are several), logging the norm before clipping."""
        if gradient_clip_val is None:
            return
        if self.replicas == 1:
            norm = clip_gradient_norm(self.trainer.strategy.model, optimizer, gradient_clip_val)
        else:
            norm = clip_per_replica([p for p in self.policy.parameters() if p.grad is not None], gradient_clip_val).mean()
        if self._logging_step():
            self.log(keys.TRAIN_GRAD_NORM, norm.detach())


def pair_metrics(stage: str, logps: PairLogps, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss, its terms, mean log-probs and, with a reference, implicit rewards log π/π_ref (unscaled by β,
    so methods compare on one scale). An accuracy counts h > 0 as 1 and a tie h = 0 as ½, averaged over
    pairs (and replicas)."""

    def key(name: str) -> str:
        return keys.stage_key(stage, name)

    metrics = {key(keys.LOSS): torch.stack(list(terms.values())).sum(0).mean()}
    if len(terms) > 1:
        metrics |= {key(keys.LOSS_TERM + name): value.mean() for name, value in terms.items()}
    metrics |= {key(keys.LOGPS_CHOSEN): logps.policy_chosen.mean(), key(keys.LOGPS_REJECTED): logps.policy_rejected.mean()}
    if logps.reference_chosen is not None and logps.reference_rejected is not None:
        margin = logps.log_ratio_margin
        metrics |= {
            key(keys.REWARDS_CHOSEN): (logps.policy_chosen - logps.reference_chosen).mean(),
            key(keys.REWARDS_REJECTED): (logps.policy_rejected - logps.reference_rejected).mean(),
            key(keys.REWARDS_MARGIN): margin.mean(),
            key(keys.REWARDS_ACCURACY): ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
        }
    policy_margin = logps.policy_margin
    metrics[key(keys.PREFERENCE_ACCURACY)] = ((policy_margin > 0).float() + 0.5 * (policy_margin == 0).float()).mean()
    return {name: value.detach() for name, value in metrics.items()}


def clip_per_replica(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each replica (leading dim) on its own; each replica's norm before
    clipping. (Replicas train in one process: a grid of language models is one run per λ.)"""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.view(-1, *([1] * (grad.dim() - 1))))
    return norms
