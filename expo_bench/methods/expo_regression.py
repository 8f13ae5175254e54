"""EXPO, regression form (Hu et al., ICML 2025, arXiv:2506.07492), as reconstructed here.

The policy's own preference p = σ(d_pol) is regressed onto a weighted average of the label's and the
reference's preference, t = (1 - λ)·z + λ·σ(d_ref), λ ∈ [0, 1]. The paper's equation text was not available to
us; this reconstruction and the ``distance`` options are documented in docs/methods.md. Both distances are proper
scoring rules of p against t, so the base's pairwise form t·ℓ(s - γ) + (1 - t)·ℓ(-s - γ) gives them:

- ``bce`` (default), ℓ(u) = -log σ(u): ``-(t·log p + (1-t)·log(1-p))`` = KL(Bern(t) ‖ Bern(p)) + H(t); its
  gradient in d_pol is p - t and never vanishes when σ saturates.
- ``squared``, ℓ(u) = (1 - σ(u))²: the Brier score ``(p - t)² + t(1 - t)``, the squared distance plus a term
  that does not depend on the policy.

At λ = 0 with ``bce`` this is the Bradley–Terry NLL; at λ = 1 its minimiser is π = π_ref.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps, PreferenceBatch
from expo_bench.methods.base import MethodParams, PreferenceMethod, bradley_terry, pairwise_loss


def brier(logit: Tensor) -> Tensor:
    """ℓ(u) = (1 - σ(u))²."""
    return (1 - torch.sigmoid(logit)) ** 2


DISTANCES: dict[str, Callable[[Tensor], Tensor]] = {"bce": bradley_terry, "squared": brier}


def regression_target(reference_margin: Tensor, label: Tensor | float, lam: float | Tensor) -> Tensor:
    """t = (1 - λ)·z + λ·σ(d_ref)."""
    return (1 - lam) * label + lam * torch.sigmoid(reference_margin)


def expo_regression_loss(
    policy_margin: Tensor,
    reference_margin: Tensor,
    label: Tensor | float,
    lam: float | Tensor,
    distance: str = "bce",
    gamma: float | Tensor = 0.0,
) -> Tensor:
    """``t·ℓ(d_pol - γ) + (1 - t)·ℓ(-d_pol - γ)`` with t = (1 - λ)z + λσ(d_ref), ℓ one of ``DISTANCES``."""
    return pairwise_loss(DISTANCES[distance], policy_margin, regression_target(reference_margin, label, lam), gamma)


class EXPORegressionParams(MethodParams):
    lam: float = Field(0.1, ge=0, le=1)
    distance: Literal["bce", "squared"] = "bce"


class EXPORegression(PreferenceMethod[EXPORegressionParams]):
    """s = d_pol, target t = (1 - λ)z + λσ(d_ref), link from ``distance``."""

    name = "expo_regression"
    Params = EXPORegressionParams
    regularization: ClassVar[str | None] = "lam"

    def preference_logit(self, logps: PairLogps) -> Tensor:
        return logps.policy_margin

    def link(self, logit: Tensor) -> Tensor:
        return DISTANCES[self.params.distance](logit)

    def target(self, logps: PairLogps, batch: PreferenceBatch) -> Tensor:
        return regression_target(logps.reference_margin, batch.label, self.hp("lam"))
