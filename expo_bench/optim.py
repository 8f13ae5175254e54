"""Optimizer configuration: any ``torch.optim`` optimizer, named in the recipe."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import Field, field_validator

from expo_bench.config_model import ConfigModel, closest

OPTIMIZERS = sorted(
    name
    for name, obj in vars(torch.optim).items()
    if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
)


class OptimizerConfig(ConfigModel):
    """``name`` is a class in ``torch.optim`` (Adam, AdamW, RMSprop, SGD, ...); ``kwargs`` go to it."""

    name: str = "Adam"
    lr: float = Field(1e-3, gt=0)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}{closest(name, OPTIMIZERS)}; torch.optim has {', '.join(OPTIMIZERS)}")
        return name

    def build(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        optimizer_class: Callable[..., torch.optim.Optimizer] = getattr(torch.optim, self.name)
        return optimizer_class(parameters, lr=self.lr, **self.kwargs)
