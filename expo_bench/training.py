"""The optimization budget of a run and the Lightning Trainer built from it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from pydantic import Field

from expo_bench import metric_keys
from expo_bench.config_model import ConfigModel
from expo_bench.optim import OptimizerConfig

LAST = "last.ckpt"
"""The file :class:`LastCheckpoint` writes."""


class TrainConfig(ConfigModel):
    """Budget, optimizer and hardware shared by every method unless a method entry overrides part of it.

    ``strategy`` is any Lightning strategy name (``ddp``, ``fsdp``, ``deepspeed_stage_2``, ...); DeepSpeed
    needs CUDA GPUs. ``max_steps: -1`` means the epochs decide.
    """

    max_epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(64, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    gradient_clip_val: float | None = Field(None, gt=0)
    accumulate_grad_batches: int = Field(1, ge=1)
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    log_every_n_steps: int = Field(10, ge=1)
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    """Where a task keeps checkpoints (language models): also every this many steps, not only per epoch."""
    keep: Literal["weights", "full", "none"] = "weights"
    """What a finished run keeps (language models): its final ``weights`` (safetensors, no optimizer state); ``full``:
    also the final Lightning checkpoint with optimizer and loop state; ``none``: nothing once it is evaluated (another
    evaluation of it later means training it again)."""

    def identity(self) -> dict[str, Any]:
        """What the numbers of a run depend on: everything but what it keeps on disk."""
        return self.model_dump(mode="json", exclude={"keep"})


def build_trainer(train: TrainConfig, callbacks: list[Callback], logger: Logger | bool = False, **overrides: Any) -> L.Trainer:
    """A Trainer from the recipe's budget, without checkpoints or start-up chatter unless asked for."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    settings: dict[str, Any] = {
        "accelerator": train.accelerator,
        "devices": train.devices,
        "strategy": train.strategy,
        "precision": train.precision,
        "max_epochs": train.max_epochs,
        "max_steps": train.max_steps,
        "gradient_clip_val": train.gradient_clip_val,
        "accumulate_grad_batches": train.accumulate_grad_batches,
        "log_every_n_steps": train.log_every_n_steps,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
        "deterministic": True,
    }
    return L.Trainer(**{**settings, **overrides})


class LossHistory(Callback):
    """``(step, train/loss)`` whenever the module logged its training loss; kept in checkpoints."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [(int(step), float(loss)) for step, loss in state_dict["losses"]]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = trainer.callback_metrics.get(metric_keys.TRAIN_LOSS)
        if loss is not None and trainer.global_step % trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            self.losses.append((trainer.global_step, float(loss)))


class RandomState(Callback):
    """The torch random streams (CPU and every GPU), kept in checkpoints so a resumed run draws what an uninterrupted
    one would (dropout); saved as tensors, so checkpoints load with ``weights_only=True``."""

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps (when set) and at every epoch's end, written so that
    a run resumed from any of them ends exactly where an uninterrupted one does.

    A step save that falls on an epoch's last batch is made at that epoch's end instead: Lightning 2.6 resumes from a
    checkpoint written after an epoch's last batch into the next epoch without counting that epoch's start, so the
    loop progress in the next checkpoint is wrong and a resume from it replays the epoch (tests/test_robustness.py).
    """

    def __init__(self, dirpath: Path, every_n_train_steps: int | None) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=Path(LAST).stem,
            enable_version_counter=False,
            every_n_train_steps=every_n_train_steps,
            save_on_train_epoch_end=True,
        )
        self._every_n_epochs = 1  # as well: the parent takes one trigger only

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
