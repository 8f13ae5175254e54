"""The Lightning callback a sweep attaches to a method's fit to evaluate it while it trains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedModel

from expo_bench.lm.evaluator import Evaluator
from expo_bench.methods.base import require_finite_weights

PolicyOf = Callable[[L.Trainer, L.LightningModule], PreTrainedModel]
"""The policy of a module in training as one unsharded model on every rank (a collective under sharded strategies)."""


class PeriodicEvaluation(Callback):
    """Evaluates the policy every ``every`` optimizer steps at the leaderboard temperature and logs the
    metrics at that step. Every rank takes part: ``policy_of`` gathers the policy whole on each, they sample their
    shares of the prompts, and rank zero judges and logs."""

    def __init__(self, evaluator: Evaluator, every: int, out_dir: Path, provenance: dict[str, Any], policy_of: PolicyOf) -> None:
        self.evaluator, self.every, self.out_dir, self.provenance = evaluator, every, out_dir, provenance
        self.policy_of = policy_of
        self.history: list[tuple[int, dict[str, float]]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), dict(metrics)) for step, metrics in state_dict["history"]]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every or (self.history and self.history[-1][0] == step):
            return
        require_finite_weights(pl_module)  # type: ignore[arg-type]  # sampling from NaN weights fails obscurely
        temperature = self.evaluator.config.headline_temperature
        policy = self.policy_of(trainer, pl_module)
        metrics = self.evaluator.evaluate(policy, self.out_dir / f"step-{step}", self.provenance, [temperature])
        self.history.append((step, metrics))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
