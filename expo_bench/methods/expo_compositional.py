"""EXPO, compositional form (EXPO paper, ICML 2025; verified against the authors' released code).

A supervised Bradley–Terry term on the policy's *own* preference σ(d_pol), with no reference inside,
plus λ·KL(π_ref ‖ π) over the whole response space (forward KL). For a language model the KL is an
expectation over y ~ π_ref(·|x), estimated by one of:

- ``reference_samples``: responses from the reference carried by the batch with weights (cached samples
  for language models; the tabular task enumerates the whole response space weighted by π_ref, which is
  exact). Faithful to the paper; always on summed log-probs, even when the pair term is length-normalized.
- ``dataset_responses``: y_w and y_l themselves, each with weight ½; unbiased only where the pairs were
  sampled from the reference (the IMDb pipeline), and on per-token means when length-normalized.

``kl_scale`` multiplies the KL; the authors' ``F.kl_div(..., reduction="mean")`` over 3 responses is
KL/3, i.e. ``kl_scale: 1/3`` reproduces their λ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps, PreferenceBatch
from expo_bench.methods.base import MethodParams, PreferenceMethod, preference_nll


def expo_compositional_loss(
    policy_margin: Tensor, label: Tensor | float, kl: Tensor, lam: float | Tensor, gamma: float | Tensor = 0.0
) -> tuple[Tensor, Tensor]:
    """The two terms: ``-(z·log σ(d_pol - γ) + (1-z)·log σ(-d_pol - γ))`` per pair, and λ·KL(π_ref ‖ π).

    ``kl`` is an estimate of KL(π_ref ‖ π) of shape ``(..., 1)``.
    """
    return preference_nll(policy_margin, label, gamma), lam * kl


def weighted_kl(reference_logps: Tensor, policy_logps: Tensor, weights: Tensor) -> Tensor:
    """Σ_m w_m (log π_ref(y_m) - log π(y_m)) over y_m ~ π_ref with weights w (summing to 1): ``(..., 1)``."""
    return ((reference_logps - policy_logps) * weights).sum(-1, keepdim=True)


def _reference_samples_kl(method: EXPOCompositional, batch: PreferenceBatch, logps: PairLogps) -> Tensor:
    if batch.kl_samples is None or batch.kl_weights is None:
        raise ValueError("kl_estimator 'reference_samples' needs reference samples in the batch (kl_samples)")
    policy = method.scores(method.policy, batch.kl_samples)  # type: ignore[arg-type]
    cached = batch.kl_reference_logps
    reference = method.reference_scores(batch.kl_samples) if cached is None else cached.float()
    return weighted_kl(reference, policy, batch.kl_weights.float())


def _dataset_responses_kl(method: EXPOCompositional, batch: PreferenceBatch, logps: PairLogps) -> Tensor:
    assert logps.reference_chosen is not None and logps.reference_rejected is not None
    chosen = logps.reference_chosen - logps.policy_chosen
    rejected = logps.reference_rejected - logps.policy_rejected
    return 0.5 * (chosen + rejected).mean(-1, keepdim=True)


KL_ESTIMATORS: dict[str, Callable[[EXPOCompositional, PreferenceBatch, PairLogps], Tensor]] = {
    "reference_samples": _reference_samples_kl,
    "dataset_responses": _dataset_responses_kl,
}


class EXPOCompositionalParams(MethodParams):
    lam: float = Field(0.1, gt=0)
    kl_estimator: Literal["reference_samples", "dataset_responses"] = "reference_samples"
    kl_scale: float = Field(1.0, gt=0)


class EXPOCompositional(PreferenceMethod):
    name = "expo_compositional"
    Params = EXPOCompositionalParams
    regularization: ClassVar[str | None] = "lam"

    @classmethod
    def requires(cls, params: MethodParams) -> frozenset[str]:
        return frozenset({"kl_samples"}) if params.kl_estimator == "reference_samples" else frozenset()  # type: ignore[attr-defined]

    def objective(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        kl = KL_ESTIMATORS[self.params.kl_estimator](self, batch, logps)  # type: ignore[attr-defined]
        lam = self.hp("lam") * self.hp("kl_scale")
        bradley_terry, regularizer = expo_compositional_loss(logps.policy_margin, batch.label, kl, lam, self.hp("gamma"))
        return {"bradley_terry": bradley_terry.mean(-1), "kl": regularizer.mean(-1)}
