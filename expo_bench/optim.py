"""Optimizer configuration: any ``torch.optim`` optimizer, named in the recipe."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator

from expo_bench.config_model import ConfigModel, closest

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRScheduler

OPTIMIZERS = sorted(
    name
    for name, obj in vars(torch.optim).items()
    if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
)


class OptimizerConfig(ConfigModel):
    """``name`` is a class in ``torch.optim`` (Adam, AdamW, RMSprop, SGD, ...); ``kwargs`` go to it."""

    name: str = "Adam"
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to ``lr`` over this many optimizer steps (the DPO paper used 150)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}{closest(name, OPTIMIZERS)}; torch.optim has {', '.join(OPTIMIZERS)}")
        return name

    def build(self, parameters: Iterable[torch.nn.Parameter]) -> OptimizerLRScheduler:
        """The optimizer, with its warmup schedule when there is one, in Lightning's return format."""
        optimizer_class: Callable[..., torch.optim.Optimizer] = getattr(torch.optim, self.name)
        optimizer = optimizer_class(parameters, lr=self.lr, **self.kwargs)
        if not self.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (self.warmup_steps + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
