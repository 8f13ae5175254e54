"""The Lightning callbacks a sweep attaches to a method's fit: its loss history and periodic evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from expo_bench import metric_keys
from expo_bench.lm.evaluation import Evaluator
from expo_bench.lm.model import policy_model


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


class PeriodicEvaluation(Callback):
    """Evaluates the policy every ``every`` optimizer steps at the leaderboard temperature and logs the
    metrics at that step; the global-zero rank samples for everyone (sampling is not sharded)."""

    def __init__(self, evaluator: Evaluator, every: int, out_dir: Path, provenance: dict[str, Any]) -> None:
        self.evaluator, self.every, self.out_dir, self.provenance = evaluator, every, out_dir, provenance
        self.history: list[tuple[int, dict[str, float]]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), dict(metrics)) for step, metrics in state_dict["history"]]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every or (self.history and self.history[-1][0] == step) or not trainer.is_global_zero:
            return
        temperature = self.evaluator.config.headline_temperature
        metrics = self.evaluator.evaluate(policy_model(pl_module), self.out_dir / f"step-{step}", self.provenance, [temperature])
        self.history.append((step, metrics))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
