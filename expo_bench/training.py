"""The optimization budget of a run, the machine it can run on, and the Lightning Trainer built from it."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from pydantic import Field
from torch import Tensor, nn
from torch.optim import Optimizer

from expo_bench import metric_keys
from expo_bench.config_model import ConfigModel
from expo_bench.optim import OptimizerConfig

LAST = "last.ckpt"
"""The file :class:`LastCheckpoint` writes."""
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

    def identity(self) -> dict[str, Any]:
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


class FSDPOnCPU(FSDPStrategy):
    """FSDP across CPU ranks over gloo. torch's FSDP runs on the CPU when it is handed the CPU as its device, but
    Lightning's ``FSDPStrategy`` hands it none there, and its accelerator check refuses the class by exact type: this
    subclass wraps the model itself with ``device_id=cpu`` and then lets Lightning finish the setup. Checkpoints gather
    the full state on rank zero without ``offload_to_cpu`` (the weights are on the CPU already; torch 2.13's FSDP
    crashes cloning them when asked to offload them there)."""

    def _full_state_on_rank_zero(self) -> Any:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.model is not None
        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        with self._full_state_on_rank_zero():
            return dict(self.model.state_dict())

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        assert self.model is not None
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        with self._full_state_on_rank_zero():
            state = FSDP.optim_state_dict(self.model, inner)
            if self.global_rank == 0:  # the standard format, as Lightning's own FSDP checkpoints store it
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        policy = self.kwargs.pop("auto_wrap_policy", None)
        try:
            if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
                model = FullyShardedDataParallel(
                    module=model,
                    cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy,
                    device_id=torch.device("cpu"),
                    auto_wrap_policy=policy,
                    **self.kwargs,
                )
            return super()._setup_model(model)  # sees the model wrapped: moves metrics, sets up checkpointing
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy


def _fsdp(train: TrainConfig, blocks: set[type[nn.Module]], machine: Machine) -> Strategy:
    # use_orig_params: the frozen reference copy and LoRA's frozen base share FSDP units with trainable weights
    return (FSDPStrategy if train.on_gpu(machine) else FSDPOnCPU)(
        auto_wrap_policy=blocks or None, use_orig_params=True, state_dict_type="full"
    )


def _deepspeed(stage: int) -> Callable[[TrainConfig, set[type[nn.Module]], Machine], Strategy]:
    return lambda train, blocks, machine: DeepSpeedStrategy(stage=stage)


STRATEGIES: dict[str, Callable[[TrainConfig, set[type[nn.Module]], Machine], Strategy | str]] = {
    "auto": lambda train, blocks, machine: "auto",
    "ddp": lambda train, blocks, machine: "ddp",
    "fsdp": _fsdp,
    "deepspeed_stage_2": _deepspeed(2),
    "deepspeed_stage_3": _deepspeed(3),
}
"""A recipe's strategy name → the Lightning strategy, given the model's transformer block classes (FSDP's units)."""


def build_trainer(
    train: TrainConfig,
    callbacks: list[Callback],
    logger: Logger | bool = False,
    blocks: set[type[nn.Module]] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer from the recipe's budget, without checkpoints or start-up chatter unless asked for."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    settings: dict[str, Any] = {
        "accelerator": train.accelerator,
        "devices": train.devices,
        "num_nodes": train.num_nodes,
        "strategy": STRATEGIES[train.strategy](train, blocks or set(), Machine.this()),
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
        "deterministic": train.deterministic,
        "use_distributed_sampler": False,  # the data modules deal their own order to the ranks (lm.data.InOrderSampler)
    }
    return L.Trainer(**{**settings, **overrides})


def _fsdp_state_dict(strategy: Strategy) -> dict[str, Tensor]:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    assert strategy.model is not None
    # offloading weights already on the CPU crashes torch 2.13's FSDP (see FSDPOnCPU)
    everywhere = FullStateDictConfig(offload_to_cpu=strategy.root_device.type != "cpu", rank0_only=False)
    with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, everywhere):
        return dict(strategy.model.state_dict())


def _deepspeed_state_dict(strategy: Strategy) -> dict[str, Tensor] | None:
    if not getattr(strategy, "zero_stage_3", False):
        return None  # stage 2 shards gradients and optimizer state only: every rank holds the weights
    import deepspeed

    module = strategy.lightning_module
    assert module is not None
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


SHARDED_WEIGHTS: dict[type[Strategy], Callable[[Strategy], dict[str, Tensor] | None]] = {
    FSDPStrategy: _fsdp_state_dict,
    DeepSpeedStrategy: _deepspeed_state_dict,
}
"""Strategies that may shard the weights → how to gather the LightningModule's whole state dict on every rank."""


def gathered_state_dict(trainer: L.Trainer) -> dict[str, Tensor] | None:
    """The trained LightningModule's whole state dict on every rank where its strategy shards the weights (a
    collective: every rank calls it); None where the module itself holds them whole on every rank."""
    family = next((cls for cls in type(trainer.strategy).__mro__ if cls in SHARDED_WEIGHTS), None)
    return None if family is None else SHARDED_WEIGHTS[family](trainer.strategy)


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
