"""The optimization budget of a run and the Lightning Trainer built from it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from expo_bench.config_model import ConfigModel
from expo_bench.optim import OptimizerConfig

if TYPE_CHECKING:  # Lightning is imported where a Trainer is built: a recipe validates without it (about 6 s)
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger


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


def build_trainer(train: TrainConfig, callbacks: list[Callback], logger: Logger | bool = False, **overrides: Any) -> L.Trainer:
    """A Trainer from the recipe's budget, without checkpoints or start-up chatter unless asked for."""
    import lightning as L

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
