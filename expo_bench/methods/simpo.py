"""SimPO (Meng et al., 2024, arXiv:2405.14734, Eq. 6): reference-free, length-normalized, with target margin γ.

γ is absolute: the SimPO repository's ``gamma_beta_ratio`` is γ/β and TRL's ``simpo_gamma`` is γ.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps
from expo_bench.methods.base import MethodParams, PreferenceMethod, preference_nll


def simpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, label: Tensor | float, beta: float | Tensor, gamma: float | Tensor
) -> Tensor:
    """``-log σ(β(log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ)`` on per-token mean log-probs (z = 1)."""
    return preference_nll(beta * (policy_chosen - policy_rejected), label, gamma)


class SimPOParams(MethodParams):
    beta: float = Field(2.0, gt=0)
    gamma: float = Field(1.0, ge=0)
    length_normalize: bool = True


class SimPO(PreferenceMethod[SimPOParams]):
    """s = β(log π(y_w)/|y_w| - log π(y_l)/|y_l|), Bradley–Terry link, no reference."""

    name = "simpo"
    Params = SimPOParams
    reference_free = True

    def preference_logit(self, logps: PairLogps) -> Tensor:
        return self.hp("beta") * logps.policy_margin
