"""EXPO, compositional form (Hu et al., ICML 2025, arXiv:2506.07492; verified against the authors' code).

A supervised Bradley–Terry term on the policy's OWN preference, with no reference inside, plus λ times the
forward KL over the whole response space (estimators: :mod:`expo_bench.methods.kl`):

    -(z·log σ(d_pol - γ) + (1 - z)·log σ(-d_pol - γ)) + λ·KL(π_ref ‖ π),   λ > 0.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps
from expo_bench.methods.base import preference_nll
from expo_bench.methods.kl import KLParams, KLRegularized


def expo_compositional_loss(
    policy_margin: Tensor, label: Tensor | float, kl: Tensor, lam: float | Tensor, gamma: float | Tensor = 0.0
) -> tuple[Tensor, Tensor]:
    """The two terms: ``-(z·log σ(d_pol - γ) + (1-z)·log σ(-d_pol - γ))`` per pair, and λ·KL(π_ref ‖ π).

    ``kl`` is an estimate of KL(π_ref ‖ π) of shape ``(..., 1)``.
    """
    return preference_nll(policy_margin, label, gamma), lam * kl


class EXPOCompositionalParams(KLParams):
    lam: float = Field(0.1, gt=0)


class EXPOCompositional(KLRegularized[EXPOCompositionalParams]):
    """s = d_pol (the policy's own preference), Bradley–Terry link, + λ·KL(π_ref ‖ π)."""

    name = "expo_compositional"
    Params = EXPOCompositionalParams
    regularization: ClassVar[str | None] = "lam"
    pair_term = "bradley_terry"

    def preference_logit(self, logps: PairLogps) -> Tensor:
        return logps.policy_margin

    def kl_weight(self) -> Tensor | float:
        return self.hp("lam")
