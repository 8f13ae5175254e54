"""f-DPO with the Jensen–Shannon divergence (Wang et al., 2024, arXiv:2309.16240, Table 1), as in the EXPO synthetic
tests."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from expo_bench.contracts import PairLogps
from expo_bench.methods.base import MethodParams, PreferenceMethod, preference_nll


def js_score(policy_logps: Tensor, reference_logps: Tensor) -> Tensor:
    """t(y) = log 2π(y) - log(π(y) + π_ref(y)) = log 2 + log σ(log π(y) - log π_ref(y)), stably."""
    return math.log(2.0) + F.logsigmoid(policy_logps - reference_logps)


def js_margin(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor) -> Tensor:
    """t(y_w) - t(y_l)."""
    return js_score(policy_chosen, reference_chosen) - js_score(policy_rejected, reference_rejected)


def fdpo_js_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    label: Tensor | float,
    beta: float | Tensor,
    gamma: float | Tensor = 0.0,
) -> Tensor:
    """``-log σ(β(t(y_w) - t(y_l)) - γ)`` with the JS score t above (z = 1, γ = 0 in the paper)."""
    return preference_nll(beta * js_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected), label, gamma)


class FDPOJSParams(MethodParams):
    beta: float = Field(0.1, gt=0)


class FDPOJS(PreferenceMethod[FDPOJSParams]):
    """s = β(t(y_w) - t(y_l)), Bradley–Terry link."""

    name = "fdpo_js"
    Params = FDPOJSParams
    regularization: ClassVar[str | None] = "beta"

    def preference_logit(self, logps: PairLogps) -> Tensor:
        assert logps.reference_chosen is not None and logps.reference_rejected is not None
        margin = js_margin(logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected)
        return self.hp("beta") * margin
