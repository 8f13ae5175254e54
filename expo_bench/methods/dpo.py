"""DPO (Rafailov et al., 2023, arXiv:2305.18290, Eq. 7) with label smoothing (conservative DPO, Mitchell 2023)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps, PreferenceBatch
from expo_bench.methods.base import MethodParams, PreferenceMethod, preference_nll


def smoothed_label(label: Tensor | float, label_smoothing: float | Tensor) -> Tensor | float:
    """cDPO's z' = (1 - ε)z + ε(1 - z): the label read as flipped with probability ε."""
    return (1 - label_smoothing) * label + label_smoothing * (1 - label)


def dpo_loss(
    log_ratio_margin: Tensor,
    label: Tensor | float,
    beta: float | Tensor,
    gamma: float | Tensor = 0.0,
    label_smoothing: float | Tensor = 0.0,
) -> Tensor:
    """``-(z'·log σ(βh - γ) + (1 - z')·log σ(-βh - γ))`` with h = d_pol - d_ref; DPO Eq. 7 at z = 1, γ = ε = 0."""
    return preference_nll(beta * log_ratio_margin, smoothed_label(label, label_smoothing), gamma)


class DPOParams(MethodParams):
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class DPO(PreferenceMethod[DPOParams]):
    """s = βh, Bradley–Terry link, target z' (cDPO)."""

    name = "dpo"
    Params = DPOParams
    regularization: ClassVar[str | None] = "beta"

    def preference_logit(self, logps: PairLogps) -> Tensor:
        return self.hp("beta") * logps.log_ratio_margin

    def target(self, logps: PairLogps, batch: PreferenceBatch) -> Tensor | float:
        return smoothed_label(batch.label, self.hp("label_smoothing"))
