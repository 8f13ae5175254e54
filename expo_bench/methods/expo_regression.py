"""EXPO, regression form (EXPO paper, ICML 2025), as reconstructed here.

The policy's own preference p = σ(d_pol - γ) is regressed onto a weighted average of the label's and
the reference's preference, t = (1 - λ)·z + λ·σ(d_ref), λ ∈ [0, 1]. The paper's equation text was not
available to us; this reconstruction and the ``distance`` options are documented in the README:

- ``bce`` (default): ``-(t·log p + (1-t)·log(1-p))`` = KL(Bern(t) ‖ Bern(p)) + const; its gradient in
  d_pol is p - t and never vanishes when σ saturates.
- ``squared``: ``(p - t)²``.

At λ = 0 with ``bce`` this is the Bradley–Terry NLL; at λ = 1 its minimiser is π = π_ref.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps, PreferenceBatch
from expo_bench.methods.base import MethodParams, PreferenceMethod, preference_nll


def _bce(policy_logit: Tensor, target: Tensor) -> Tensor:
    return preference_nll(policy_logit, target)


def _squared(policy_logit: Tensor, target: Tensor) -> Tensor:
    return (torch.sigmoid(policy_logit) - target) ** 2


DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"bce": _bce, "squared": _squared}


def expo_regression_loss(
    policy_margin: Tensor,
    reference_margin: Tensor,
    label: Tensor | float,
    lam: float | Tensor,
    distance: str = "bce",
    gamma: float | Tensor = 0.0,
) -> Tensor:
    """``D(σ(d_pol - γ), (1 - λ)z + λσ(d_ref))`` per example, D one of ``DISTANCES``."""
    target = (1 - lam) * label + lam * torch.sigmoid(reference_margin)
    return DISTANCES[distance](policy_margin - gamma, target)


class EXPORegressionParams(MethodParams):
    lam: float = Field(0.1, ge=0, le=1)
    distance: Literal["bce", "squared"] = "bce"


class EXPORegression(PreferenceMethod):
    name = "expo_regression"
    Params = EXPORegressionParams
    regularization: ClassVar[str | None] = "lam"

    def objective(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        loss = expo_regression_loss(
            logps.policy_margin,
            logps.reference_margin,
            batch.label,
            self.hp("lam"),
            self.params.distance,  # type: ignore[attr-defined]
            self.hp("gamma"),
        )
        return {"loss": loss.mean(-1)}
