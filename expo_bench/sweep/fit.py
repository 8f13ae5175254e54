"""One language-model run: train a (method, hyperparameters, seed) from the SFT weights, checkpointing under its run
directory, then evaluate it. A finished run is reused, a checkpointed one resumed, evaluations kept per evaluation
config."""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from rich.console import Console
from transformers import PreTrainedModel

from expo_bench import metric_keys
from expo_bench.cache import digest
from expo_bench.lm.data import PairData
from expo_bench.lm.evaluation import Evaluator
from expo_bench.lm.model import REFERENCES, CausalLMScorer, LoraSettings, policy_model
from expo_bench.methods.base import MethodParams, PreferenceMethod
from expo_bench.recipe import MethodRun
from expo_bench.sweep.callbacks import LossHistory, PeriodicEvaluation
from expo_bench.sweep.records import LanguageModelIdentity, TrainingResult, display_name
from expo_bench.tracking import TrackedRun
from expo_bench.training import build_trainer

RECORD = "record.json"
"""Written last into a run directory: its presence means the run finished training."""
CHECKPOINT = "last.ckpt"


@dataclass(frozen=True)
class FitUnit:
    """One (method, hyperparameters, seed) to train and the setup it trains in."""

    run: MethodRun
    params: MethodParams
    lam: float | None
    seed: int
    data_fingerprint: str
    reference_fingerprint: str
    lora: LoraSettings | None
    reference: str
    runs_dir: Path

    @property
    def name(self) -> str:
        return display_name(self.run.label, self.lam)

    @property
    def identity(self) -> LanguageModelIdentity:
        return LanguageModelIdentity(
            method_class=f"{self.run.method.__module__}:{self.run.method.__qualname__}",
            seed=self.seed,
            data_fingerprint=self.data_fingerprint,
            reference_fingerprint=self.reference_fingerprint,
            params=self.params.model_dump(mode="json"),
            train=self.run.train.model_dump(mode="json"),
            lora=None if self.lora is None else self.lora.model_dump(),
            reference=self.reference,
        )

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.run.label)}-{digest(self.identity.as_json())}"

    @property
    def finished(self) -> bool:
        return (self.run_dir / RECORD).exists()

    def module(self, base: PreTrainedModel) -> PreferenceMethod:
        """The method's module around a fresh copy of the SFT weights (LoRA-wrapped if asked)."""
        L.seed_everything(self.seed, verbose=False)
        policy = copy.deepcopy(base) if self.lora is None else self.lora.wrap(copy.deepcopy(base))
        reference = None if self.run.method.reference_free else REFERENCES[self.reference](base, policy)
        return self.run.method(CausalLMScorer(policy), reference, [self.params], self.run.train.optimizer)


def fit(
    unit: FitUnit,
    base: PreTrainedModel,
    data: PairData,
    evaluator: Evaluator | None,
    every_n_steps: int | None,
    tracked: TrackedRun,
    console: Console,
) -> tuple[TrainingResult, dict[str, float] | None]:
    """Train (or reuse, or resume) ``unit``, evaluate it, and record both in ``tracked``."""
    module = None
    if unit.finished:
        console.print(f"  {unit.name}: finished in an earlier run, reusing {unit.run_dir / RECORD}")
        training = TrainingResult.from_json(json.loads((unit.run_dir / RECORD).read_text()))
    else:
        periodic = None
        if evaluator is not None and every_n_steps is not None:
            where = unit.run_dir / "evaluation-during-training"
            periodic = PeriodicEvaluation(evaluator, every_n_steps, where, {"method": unit.name})
        module, training = _train(unit, base, data, periodic, tracked, console)
    evaluation = None
    if evaluator is not None:
        if module is None and not evaluator.has_result(unit.run_dir):
            module = _restore(unit, base)
        evaluation = evaluate(evaluator, unit.name, None if module is None else policy_model(module), unit.run_dir, console)
    if not tracked.complete:
        tracked.log_metrics(training.eval_after | (evaluation or {}))
        done = [unit.run_dir / RECORD] + ([] if evaluator is None else [evaluator.results_dir(unit.run_dir)])
        tracked.log_artifacts(done)
        tracked.mark_complete()
    return training, evaluation


def _train(
    unit: FitUnit,
    base: PreTrainedModel,
    data: PairData,
    periodic: PeriodicEvaluation | None,
    tracked: TrackedRun,
    console: Console,
) -> tuple[PreferenceMethod, TrainingResult]:
    train, run_dir = unit.run.train, unit.run_dir
    module = unit.module(base)
    history = LossHistory()
    checkpoints = ModelCheckpoint(
        dirpath=run_dir, filename="last", enable_version_counter=False, every_n_train_steps=train.checkpoint_every_n_steps
    )
    callbacks: list[Callback] = [history, checkpoints, RichProgressBar(leave=False)]
    if periodic is not None:
        callbacks.append(periodic)
    trainer = build_trainer(train, callbacks, logger=tracked.logger(), enable_checkpointing=True)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    resume = run_dir / CHECKPOINT
    if resume.exists():
        console.print(f"  {unit.name}: resuming from {resume}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume if resume.exists() else None)
    seconds = time.perf_counter() - started
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    accuracy = (
        metric_keys.VAL_REWARDS_ACCURACY if metric_keys.VAL_REWARDS_ACCURACY.key in after else metric_keys.VAL_PREFERENCE_ACCURACY
    )
    console.print(
        f"  {unit.name}: {trainer.global_step} steps in {seconds:.1f} s; held-out loss "
        f"{before[metric_keys.VAL_LOSS.key]:.4f} -> {after[metric_keys.VAL_LOSS.key]:.4f}, "
        f"{accuracy.name} {after[accuracy.key]:.3f}"
    )
    training = TrainingResult(
        steps=trainer.global_step,
        train_seconds=round(seconds, 3),
        eval_before=dict(before),
        eval_after=dict(after),
        loss_history=history.losses,
        eval_history=[] if periodic is None else periodic.history,
        checkpoint=str(resume),
    )
    record = {"method": unit.run.label, "lam": unit.lam, **unit.identity.as_json(), **asdict(training)}
    partial = run_dir / f"{RECORD}.partial"
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(run_dir / RECORD)  # written last: its presence means the run finished
    return module, training


def _restore(unit: FitUnit, base: PreTrainedModel) -> PreferenceMethod:
    """A finished run's trained module, from its last checkpoint."""
    module = unit.module(base)
    checkpoint = torch.load(unit.run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    return module


def evaluate(
    evaluator: Evaluator, name: str, policy: PreTrainedModel | None, run_dir: Path, console: Console
) -> dict[str, float]:
    """A run's metrics under ``evaluator`` (computed at most once), with its headline printed."""
    metrics, hit = evaluator.evaluate_once(policy, run_dir, {"method": name, "run": run_dir.name}, console)
    headline = ", ".join(f"{metric.name} {metrics[metric.key]:.3f}" for metric in metric_keys.HEADLINE if metric.key in metrics)
    console.print(f"  {name}: {'evaluated in an earlier run' if hit else 'evaluated'}: {headline}")
    return metrics
