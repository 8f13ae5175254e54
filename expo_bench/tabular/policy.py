"""A softmax policy over R responses for each of P prompts (one-hot prompt features), replicated G times, and
the record of its trajectory during training."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
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


def kl(p: Tensor, q: Tensor) -> float:
    """KL(p ‖ q) of two categorical distributions."""
    return float((p * (p.log() - q.log())).sum())


class PolicyTrajectory(Callback):
    """π(·|x) of every replica at the start and every ``every`` optimizer steps: ``(T, G, P, R)``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[int] = []
        self.probabilities: list[Tensor] = []

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps.append(trainer.global_step)
        self.probabilities.append(cast(TabularPolicy, pl_module.policy).probabilities())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)
