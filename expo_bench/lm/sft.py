"""Supervised fine-tuning on chosen responses ("Preferred-FT", the DPO paper's reference)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor

from expo_bench.contracts import PreferenceBatch
from expo_bench.lm.model import CausalLMScorer
from expo_bench.optim import OptimizerConfig


class SupervisedFineTuning(L.LightningModule):
    """Mean negative log-likelihood per response token of the chosen responses (prompt tokens masked)."""

    def __init__(self, scorer: CausalLMScorer, optimizer: OptimizerConfig) -> None:
        super().__init__()
        self.scorer, self.optimizer_config = scorer.train(), optimizer  # Hugging Face models load in eval mode

    def nll(self, batch: PreferenceBatch) -> Tensor:
        return -self.scorer.sequence_logps(batch.chosen).sum() / batch.chosen_tokens.sum()

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss = self.nll(batch)
        self.log("sft/train_nll", loss.detach(), batch_size=len(batch), sync_dist=True)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self.log("sft/val_nll", self.nll(batch), batch_size=len(batch), sync_dist=True, on_epoch=True)

    def transfer_batch_to_device(self, batch: PreferenceBatch, device: torch.device, dataloader_idx: int) -> PreferenceBatch:
        return batch.to(device)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        return self.optimizer_config.build(self.scorer.parameters())
