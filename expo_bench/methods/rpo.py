"""RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733, Eq. 1): DPO plus α times
the per-token negative log-likelihood of the chosen response, a second regularizer any method could add:

    -(z'·log σ(βh - γ) + (1 - z')·log σ(-βh - γ)) - α·(z·log π(y_w) / |y_w| + (1 - z)·log π(y_l) / |y_l|)

With a hard label (z = 1) this is the paper's NLL of the chosen response; with a soft label it is the expected NLL of
the winner, so a flipped pair with a flipped label has the same loss. The NLL is each pair's own per-token mean (the
paper's form), averaged over pairs; a token-weighted mean over the whole batch would weight long responses more.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from expo_bench.contracts import PairLogps, PreferenceBatch
from expo_bench.methods.dpo import DPO, DPOParams


class RPOParams(DPOParams):
    alpha: float = Field(1.0, ge=0)


class RPO(DPO):
    """DPO's pairwise term (s = βh) + α·NLL of the winner per token."""

    name = "rpo"
    Params = RPOParams

    def regularizers(self, logps: PairLogps, batch: PreferenceBatch) -> dict[str, Tensor]:
        z = batch.label
        winner = z * logps.chosen_token_mean + (1 - z) * logps.rejected_token_mean
        return {"nll": (-self.hp("alpha") * winner).mean(-1)}
