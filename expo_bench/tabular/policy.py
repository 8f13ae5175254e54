"""A softmax policy over R responses for each of P prompts (one-hot prompt features), replicated G times."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from expo_bench.contracts import Sequences


class TabularPolicy(nn.Module):
    """Logits θ ∈ R^{G×P×R}, initialised so that softmax(θ) = π_ref for every replica."""

    def __init__(self, pi_ref: Tensor, replicas: int = 1) -> None:
        super().__init__()
        self.logits = nn.Parameter(pi_ref.log().expand(replicas, *pi_ref.shape).clone())

    def sequence_logps(self, sequences: Sequences) -> Tensor:
        """``(G, N)`` log π(response | prompt)."""
        return torch.log_softmax(self.logits, dim=-1)[:, sequences["prompt"], sequences["response"]]

    @torch.no_grad()
    def response_entropy(self, sequences: Sequences) -> Tensor:
        """``(G, N)`` entropy of π(· | prompt): a tabular response is a single token."""
        logps = torch.log_softmax(self.logits, dim=-1)
        return -(logps.exp() * logps).sum(-1)[:, sequences["prompt"]]

    def probabilities(self) -> Tensor:
        """``(G, P, R)`` π(· | prompt) per replica."""
        return torch.softmax(self.logits.detach(), dim=-1)
