"""IPO (Azar et al., 2024, arXiv:2310.12036, Eq. 17): squared regression of the log-ratio margin onto 1/(2τ).

Summed log-probs by default, as in the IPO paper and the DPO repository; ``length_normalize: true``
gives TRL's per-token mean. The choice is a logged hyperparameter, never an implicit default.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps
from expo_bench.methods.base import MethodParams, PreferenceMethod, pairwise_loss


def ipo_link(logit: Tensor, tau: float | Tensor) -> Tensor:
    """ℓ(u) = (u - 1/(2τ))²."""
    return (logit - 1 / (2 * tau)) ** 2


def ipo_loss(log_ratio_margin: Tensor, label: Tensor | float, tau: float | Tensor, gamma: float | Tensor = 0.0) -> Tensor:
    """``z·(h - γ - 1/(2τ))² + (1 - z)·(h + γ + 1/(2τ))²``; Eq. 17 at z = 1, γ = 0.

    With a soft label the minimiser is h = (2z - 1)(γ + 1/(2τ)).
    """
    return pairwise_loss(lambda logit: ipo_link(logit, tau), log_ratio_margin, label, gamma)


class IPOParams(MethodParams):
    tau: float = Field(0.1, gt=0)


class IPO(PreferenceMethod[IPOParams]):
    """s = h, link (u - 1/(2τ))²."""

    name = "ipo"
    Params = IPOParams
    regularization: ClassVar[str | None] = "tau"

    def preference_logit(self, logps: PairLogps) -> Tensor:
        return logps.log_ratio_margin

    def link(self, logit: Tensor) -> Tensor:
        return ipo_link(logit, self.hp("tau"))
