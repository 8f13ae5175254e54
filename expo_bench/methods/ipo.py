"""IPO (Azar et al., 2024, Eq. 17): squared regression of the log-ratio margin onto 1/(2τ).

Summed log-probs by default, as in the IPO paper and the DPO repository; ``length_normalize: true``
gives TRL's per-token mean. The choice is a logged hyperparameter, never an implicit default.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps, PreferenceBatch
from expo_bench.methods.base import MethodParams, PreferenceMethod


def ipo_loss(log_ratio_margin: Tensor, label: Tensor | float, tau: float | Tensor, gamma: float | Tensor = 0.0) -> Tensor:
    """``z·(h - γ - 1/(2τ))² + (1 - z)·(h + γ + 1/(2τ))²``; Eq. 17 at z = 1, γ = 0.

    With a soft label the minimiser is h = (2z - 1)(γ + 1/(2τ)).
    """
    target = gamma + 1 / (2 * tau)
    return label * (log_ratio_margin - target) ** 2 + (1 - label) * (log_ratio_margin + target) ** 2


class IPOParams(MethodParams):
    tau: float = Field(0.1, gt=0)


class IPO(PreferenceMethod):
    name = "ipo"
    Params = IPOParams
    regularization: ClassVar[str | None] = "tau"

    def objective(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        return {"loss": ipo_loss(logps.log_ratio_margin, batch.label, self.hp("tau"), self.hp("gamma")).mean(-1)}
