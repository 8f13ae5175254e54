"""Optimizer configuration: any ``torch.optim`` optimizer, named in the recipe."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, ValidationInfo, field_validator

from expo_bench.config_model import ConfigModel, closest, reject_non_finite, reject_unknown_keys

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRScheduler

OPTIMIZERS = sorted(
    name
    for name, obj in vars(torch.optim).items()
    if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
)


class OptimizerConfig(ConfigModel):
    """``name`` is a class in ``torch.optim`` (Adam, AdamW, RMSprop, SGD, ...); ``kwargs`` go to it, checked at validation
    against its signature and by building it once on a dummy parameter (so ``betass`` or ``betas: [2, 0]`` fail before
    any work, not after SFT)."""

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

    @field_validator("kwargs")
    @classmethod
    def _kwargs_accepted(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "name" not in info.data or "lr" not in info.data:
            return kwargs  # the name or lr is wrong already, and reported
        name, optimizer_class = info.data["name"], getattr(torch.optim, info.data["name"])
        taken = [p for p in inspect.signature(optimizer_class).parameters if p not in ("params", "lr")]
        reject_unknown_keys(kwargs, taken, f"torch.optim.{name}")
        reject_non_finite(kwargs)
        if not kwargs:
            return kwargs  # nothing to try: a trial build costs a second (torch.optim's first use imports more)
        try:
            optimizer_class([torch.nn.Parameter(torch.zeros(1))], lr=info.data["lr"], **kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"torch.optim.{name} refuses {kwargs}: {error}") from None
        return kwargs

    def build(self, parameters: Iterable[torch.nn.Parameter]) -> OptimizerLRScheduler:
        """The optimizer, with its warmup schedule when there is one, in Lightning's return format."""
        optimizer_class: Callable[..., torch.optim.Optimizer] = getattr(torch.optim, self.name)
        optimizer = optimizer_class(parameters, lr=self.lr, **self.kwargs)
        if not self.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (self.warmup_steps + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def clip_gradient_norm(root: torch.nn.Module | None, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``optimizer``'s parameters so that their joint 2-norm is at most ``max_norm``; the norm
    before clipping.

    Under FSDP each rank holds a shard of every gradient, and ``torch.nn.utils.clip_grad_norm_`` would scale each shard
    by that shard's own norm (why Lightning refuses norm clipping under FSDP): the root FSDP module (``root``) sums the
    squared norms over the ranks first, so every rank scales by the one factor a single process would use.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        return root.clip_grad_norm_(max_norm)
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
