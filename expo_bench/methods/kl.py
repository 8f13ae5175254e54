"""KL(π_ref ‖ π) = E_{y~π_ref}[log π_ref(y) − log π(y)], the regularizer of EXPO-compositional, as a term any
method can add (:class:`KLRegularized`). The estimator is a named, logged choice:

- ``reference_samples`` (default): responses y_m ~ π_ref carried by the batch with weights (cached samples for
  language models; the tabular task enumerates the whole response space weighted by π_ref, which is exact).
  Always on summed log-probs, even when the pair term is length-normalized.
- ``dataset_responses``: y_w and y_l themselves, each with weight ½; unbiased only where the pairs were sampled
  from the reference (the IMDb pipeline), and on per-token means when length-normalized.

``kl_scale`` multiplies the KL: the EXPO authors' ``F.kl_div(..., reduction="mean")`` over 3 responses is KL/3,
i.e. ``kl_scale: 1/3`` reproduces their λ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps, PreferenceBatch
from expo_bench.methods.base import KL_SAMPLES, MethodParams, PreferenceMethod

KLEstimator = Literal["reference_samples", "dataset_responses"]


def _reference_samples(logps: PairLogps) -> Tensor:
    assert logps.samples is not None, "the base computes sample log-probs for methods that require kl_samples"
    return logps.samples.kl()


def _dataset_responses(logps: PairLogps) -> Tensor:
    assert logps.reference_chosen is not None and logps.reference_rejected is not None
    chosen = logps.reference_chosen - logps.policy_chosen
    rejected = logps.reference_rejected - logps.policy_rejected
    return 0.5 * (chosen + rejected).mean(-1, keepdim=True)


KL_ESTIMATORS: dict[str, Callable[[PairLogps], Tensor]] = {
    "reference_samples": _reference_samples,
    "dataset_responses": _dataset_responses,
}
"""Estimator name → KL(π_ref ‖ π) estimate of shape ``(..., 1)``."""


class KLParams(MethodParams):
    kl_estimator: KLEstimator = "reference_samples"
    kl_scale: float = Field(1.0, gt=0)


KLParamsT = TypeVar("KLParamsT", bound=KLParams)


class KLRegularized(PreferenceMethod[KLParamsT]):
    """Adds ``kl_weight() · kl_scale · KL(π_ref ‖ π)`` to the method's loss, logged as the term ``kl``."""

    Params = KLParams

    @classmethod
    def requires(cls, params: KLParamsT) -> frozenset[str]:
        return frozenset({KL_SAMPLES}) if params.kl_estimator == "reference_samples" else frozenset()

    def kl_weight(self) -> Tensor | float:
        raise NotImplementedError

    def regularizers(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        kl = KL_ESTIMATORS[self.params.kl_estimator](logps)
        return {"kl": (self.kl_weight() * self.hp("kl_scale") * kl).mean(-1)}
