"""Supervised fine-tuning on chosen responses ("Preferred-FT", the DPO paper's reference), cached on disk."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from rich.console import Console
from torch import Tensor
from transformers import PreTrainedModel

from expo_bench import metric_keys as keys
from expo_bench.cache import cached
from expo_bench.contracts import PreferenceBatch
from expo_bench.distributed import mean_over_ranks
from expo_bench.lm.data import PairData, PairDataset, fingerprint_module, fingerprint_pairs
from expo_bench.lm.model import CausalLMScorer, enable_gradient_checkpointing, transformer_blocks
from expo_bench.lm.tokenize import TokenizedPair
from expo_bench.optim import OptimizerConfig, clip_gradient_norm
from expo_bench.train_config import TrainConfig
from expo_bench.trainer import build_trainer, gathered_state_dict


class SupervisedFineTuning(L.LightningModule):
    """Mean negative log-likelihood per response token of the chosen responses (prompt tokens masked)."""

    def __init__(self, scorer: CausalLMScorer, optimizer: OptimizerConfig) -> None:
        super().__init__()
        self.scorer, self.optimizer_config = scorer.train(), optimizer  # Hugging Face models load in eval mode

    def nll(self, batch: PreferenceBatch) -> Tensor:
        """Divided by the mean token count of the ranks' batches, so that the ranks' mean is the NLL per token of
        the global batch (what one process would compute), not a mean of per-rank means."""
        tokens = mean_over_ranks(batch.chosen_tokens.sum())
        return -self.scorer.sequence_logps(batch.chosen).sum() / tokens

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss = self.nll(batch)
        self.log(keys.SFT_TRAIN_NLL, loss.detach(), batch_size=len(batch), sync_dist=True)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self.log(keys.SFT_VAL_NLL, self.nll(batch), batch_size=len(batch), sync_dist=True, on_epoch=True)

    def transfer_batch_to_device(self, batch: PreferenceBatch, device: torch.device, dataloader_idx: int) -> PreferenceBatch:
        return batch.to(device)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        return self.optimizer_config.build(self.scorer.parameters())

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Norm clipping that is right under every strategy (FSDP included), logging the norm before clipping."""
        if gradient_clip_val is not None:
            norm = clip_gradient_norm(self.trainer.strategy.model, optimizer, gradient_clip_val)
            self.log(keys.SFT_GRAD_NORM, norm.detach())


@dataclass(frozen=True)
class SFTResult:
    """Held-out NLL per response token before and after fine-tuning, and the optimizer steps it took."""

    val_nll_before: float
    val_nll_after: float
    steps: int

    def provenance(self) -> dict[str, float | int]:
        return {"sft_val_nll_before": self.val_nll_before, "sft_val_nll_after": self.val_nll_after, "sft_steps": self.steps}


def fine_tune(
    base: PreTrainedModel,
    train: Sequence[TokenizedPair],
    held_out: Sequence[TokenizedPair],
    pad: int,
    seed: int,
    config: TrainConfig,
    cache_dir: Path,
    console: Console,
) -> SFTResult:
    """Fine-tune ``base`` in place on the chosen responses; the result is cached, keyed by the initial weights, the
    data, the SFT settings and the seed, so a rerun or a later sweep loads it instead."""
    key = {
        "initial": fingerprint_module(base),
        "data": fingerprint_pairs([*train, *held_out]),
        "sft": config.result_settings(),
        "seed": seed,
    }

    def fresh() -> SupervisedFineTuning:
        """A module around a copy of ``base``: each Trainer stage gets one no stage has set up (FSDP shards it)."""
        model = copy.deepcopy(base)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return SupervisedFineTuning(CausalLMScorer(model), config.optimizer)

    def compute() -> dict[str, Any]:
        data = PairData(PairDataset(train, pad), PairDataset(held_out, pad), config.batch_size, seed, config.group_by_length)
        trainer = build_trainer(config, [RichProgressBar(leave=False)], blocks=transformer_blocks(base))
        before = trainer.validate(fresh(), datamodule=data, verbose=False)[0][keys.SFT_VAL_NLL]
        module = fresh()
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        state = gathered_state_dict(trainer)
        weights = {name: tensor.detach().cpu().clone() for name, tensor in (state or module.state_dict()).items()}
        if state is not None:  # the trained module holds shards: validate a whole copy
            module = fresh()
            module.load_state_dict(state)
        after = trainer.validate(module, datamodule=data, verbose=False)[0][keys.SFT_VAL_NLL]
        prefix = "scorer.model."
        return {
            "weights": {name.removeprefix(prefix): tensor for name, tensor in weights.items()},
            "metrics": {"sft_val_nll_before": before, "sft_val_nll_after": after, "sft_steps": trainer.global_step},
            "seconds": time.perf_counter() - started,
        }

    stored, hit = cached(cache_dir, "sft", key, compute)
    base.load_state_dict(stored["weights"])
    metrics = stored["metrics"]
    result = SFTResult(float(metrics["sft_val_nll_before"]), float(metrics["sft_val_nll_after"]), int(metrics["sft_steps"]))
    console.print(
        f"  SFT: held-out NLL per token {result.val_nll_before:.3f} -> {result.val_nll_after:.3f} "
        f"in {result.steps} steps, " + ("from the cache" if hit else f"{stored['seconds']:.1f} s")
    )
    return result
