"""DPO plus EXPO's regularizer (arXiv:2506.07492): λ_KL·KL(π_ref ‖ π), on the same reference samples as
EXPO-compositional.

An ablation, not a published method: EXPO-compositional differs from DPO in two ingredients, its explicit preference
model (Bradley–Terry on the policy's own preference d_pol instead of on the implicit reward βh) and its forward-KL
regularizer on reference samples. This method keeps DPO's preference model and adds the regularizer, so a comparison
with both tells which ingredient a gain comes from.

    -(z'·log σ(βh - γ) + (1 - z')·log σ(-βh - γ)) + λ_KL·KL(π_ref ‖ π)
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from expo_bench.methods.dpo import DPO, DPOParams
from expo_bench.methods.kl import KLParams, KLRegularized


class DPOKLParams(DPOParams, KLParams):
    kl_lam: float = Field(0.1, gt=0)
    """λ_KL, the weight of KL(π_ref ‖ π) (β stays DPO's λ)."""


class DPOKL(KLRegularized[DPOKLParams], DPO):
    """DPO's pairwise term (s = βh) + λ_KL·KL(π_ref ‖ π)."""

    name = "dpo_kl"
    Params = DPOKLParams

    def kl_weight(self) -> Tensor | float:
        return self.hp("kl_lam")
