"""The optimization budget of a run and the machine it can run on (Lightning's side is :mod:`expo_bench.trainer`: a recipe
validates without importing Lightning)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator

from expo_bench.config_model import ConfigModel
from expo_bench.optim import OptimizerConfig

StrategyName = Literal["auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3"]
Precision = Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"]


class TrainConfig(ConfigModel):
    """Budget, optimizer and hardware shared by every method unless a method entry overrides part of it.

    Every stage of a recipe trains in one world of ``num_nodes`` × ``devices`` processes. ``max_steps: -1`` means
    the epochs decide.
    """

    max_epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(64, ge=1)
    """Pairs per rank and step: the global batch is ``batch_size × devices × num_nodes × accumulate_grad_batches``."""
    optimizer: OptimizerConfig = OptimizerConfig()
    gradient_clip_val: float | None = Field(None, gt=0)
    accumulate_grad_batches: int = Field(1, ge=1)
    precision: Precision = "32-true"
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Processes per node: GPUs, or CPU processes (gloo) with ``accelerator: cpu``."""
    num_nodes: int = Field(1, ge=1)
    strategy: StrategyName = "auto"
    """``ddp``; ``fsdp`` (weights, gradients and optimizer state sharded per transformer block; on CPU ranks too);
    ``deepspeed_stage_2``/``_3`` (CUDA only; ``pip install -e ".[deepspeed]"``)."""
    deterministic: bool | Literal["warn"] = True
    """``torch.use_deterministic_algorithms`` for the whole process (generation outside the Trainer included);
    ``warn`` only warns where a kernel has no deterministic version; false lets cuDNN/cuBLAS pick the fastest."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of storing them."""
    group_by_length: int | None = Field(None, ge=2)
    """Sort each run of this many global batches by length before batching them, to cut padding (training only)."""
    log_every_n_steps: int = Field(10, ge=1)
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    """Where a task keeps checkpoints (language models): also every this many steps, not only per epoch."""
    keep: Literal["weights", "full", "none"] = "weights"
    """What a finished run keeps (language models): its final ``weights`` (safetensors, no optimizer state); ``full``:
    also the final Lightning checkpoint with optimizer and loop state; ``none``: nothing once it is evaluated (another
    evaluation of it later means training it again)."""

    @model_validator(mode="after")
    def _clipping_sees_unscaled_gradients(self) -> TrainConfig:
        if self.precision == "16-mixed" and self.gradient_clip_val is not None and self.optimizer.kwargs.get("fused"):
            raise ValueError(
                "gradient_clip_val with a fused optimizer under 16-mixed: the fused step unscales fp16 gradients itself, "
                "after clipping would have scaled them (drop optimizer.kwargs.fused, or use bf16-mixed)"
            )
        return self

    def result_settings(self) -> dict[str, Any]:
        """What the numbers of a run depend on: everything but what it keeps on disk."""
        return self.model_dump(mode="json", exclude={"keep"})

    def on_gpu(self, machine: Machine) -> bool:
        return self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and machine.gpus > 0)

    def machine_problems(self, machine: Machine) -> list[tuple[str, str]]:
        """Why this budget cannot train on ``machine``, as (field, message); empty when it can."""
        gpu = self.on_gpu(machine)
        problems = []
        if self.accelerator in ("gpu", "cuda") and machine.gpus == 0:
            problems.append(("accelerator", f"{self.accelerator!r} needs a CUDA GPU, and torch sees none on this machine"))
        available, unit = (machine.gpus, "GPUs") if gpu else (machine.cpus, "CPU cores")
        if isinstance(self.devices, int) and available and self.devices > available:
            problems.append(("devices", f"{self.devices} asked, this machine has {available} {unit}"))
        if self.strategy.startswith("deepspeed"):
            if not gpu:
                problems.append(("strategy", f"{self.strategy} runs on CUDA GPUs only (Lightning refuses DeepSpeed on CPU)"))
            if "deepspeed" not in machine.packages:
                problems.append(("strategy", f'{self.strategy} needs DeepSpeed: DS_BUILD_OPS=0 pip install -e ".[deepspeed]"'))
        if self.precision == "16-mixed" and not gpu:
            problems.append(("precision", "16-mixed (fp16 AMP) needs a GPU; on CPU use bf16-mixed or 32-true"))
        if self.precision.startswith("bf16") and gpu and machine.gpus and not machine.bf16:
            problems.append(
                ("precision", f"{self.precision}: this machine's GPU has no bfloat16 support; use 16-mixed or 32-true")
            )
        return problems


@dataclass(frozen=True)
class Machine:
    """What a recipe's stages can use here."""

    gpus: int
    bf16: bool
    """Whether the GPUs compute in bfloat16."""
    cpus: int
    packages: frozenset[str]
    """The optional packages installed: ``deepspeed``, ``flash_attn``."""

    @classmethod
    def this(cls) -> Machine:
        gpus = torch.cuda.device_count()
        optional = ("deepspeed", "flash_attn")
        return cls(
            gpus=gpus,
            bf16=gpus > 0 and torch.cuda.is_bf16_supported(),
            cpus=os.cpu_count() or 1,
            packages=frozenset(name for name in optional if importlib.util.find_spec(name) is not None),
        )
