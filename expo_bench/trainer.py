"""The Lightning Trainer a run's budget builds: strategies (FSDP on CPU ranks too), whole weights gathered from sharded
ones, and the callbacks every run trains with (loss history, random state, exact-resume checkpoints)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import Tensor, nn
from torch.optim import Optimizer

from expo_bench import metric_keys
from expo_bench.train_config import Machine, TrainConfig

LAST = "last.ckpt"
"""The file :class:`LastCheckpoint` writes."""


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


class FSDPPrecisionOnCPU(FSDPPrecision):
    """Lightning's FSDP precision autocasts on CUDA only: on CPU ranks ``bf16-mixed`` would run every op in FSDP's bf16
    copies of the weights, without the float32 ops autocast keeps (softmax, log-softmax, norms), unlike on a GPU."""

    def forward_context(self) -> AbstractContextManager:
        if self.precision == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().forward_context()


def _fsdp(train: TrainConfig, blocks: set[type[nn.Module]], machine: Machine) -> Strategy:
    # use_orig_params: the frozen reference copy and LoRA's frozen base share FSDP units with trainable weights
    settings: dict[str, Any] = {"auto_wrap_policy": blocks or None, "use_orig_params": True, "state_dict_type": "full"}
    if train.on_gpu(machine):
        return FSDPStrategy(**settings)
    return FSDPOnCPU(precision_plugin=FSDPPrecisionOnCPU(train.precision), **settings)


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
    if SLURMEnvironment.detect():  # no auto-requeue: its checkpoint lands in the working directory, which every run
        settings["plugins"] = [SLURMEnvironment(auto_requeue=False)]  # shares, and the next fit of any run resumes from it
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
    """``(step, train/loss)`` whenever the module logged its training loss, and ``(step, train/grad_norm)`` whenever it
    logged the gradient norm before clipping; kept in checkpoints."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self.grad_norms: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "grad_norms": self.grad_norms}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [(int(step), float(loss)) for step, loss in state_dict["losses"]]
        self.grad_norms = [(int(step), float(norm)) for step, norm in state_dict.get("grad_norms", [])]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % trainer.log_every_n_steps:  # type: ignore[attr-defined]
            return
        for key, history in ((metric_keys.TRAIN_LOSS, self.losses), (metric_keys.TRAIN_GRAD_NORM, self.grad_norms)):
            value = trainer.callback_metrics.get(key)
            if value is not None and (not history or history[-1][0] != trainer.global_step):
                history.append((trainer.global_step, float(value)))


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
