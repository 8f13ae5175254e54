"""One language-model run: train a (method, hyperparameters, seed) from the SFT weights, checkpointing under its run
directory, then evaluate it. A finished run is reused, a checkpointed one resumed (exactly, from any checkpoint),
evaluations kept per evaluation config; a run that diverges is recorded as failed. One process at a time works on a
run directory: another sweep on the same store waits for it, then reuses what it did."""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, RichProgressBar
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import PreTrainedModel

from expo_bench import metric_keys
from expo_bench.cache import atomic_write, digest, file_sha256, locked, sealed_write, unsafe_file
from expo_bench.distributed import broadcast, is_global_zero
from expo_bench.errors import UserError
from expo_bench.lm.data import PairData
from expo_bench.lm.evaluator import Evaluator
from expo_bench.lm.model import (
    REFERENCES,
    CausalLMScorer,
    LoraSettings,
    enable_gradient_checkpointing,
    policy_model,
    transformer_blocks,
)
from expo_bench.methods.base import DivergedError, MethodParams, PreferenceMethod, require_finite_weights
from expo_bench.recipe import MethodRun
from expo_bench.sweep.callbacks import PeriodicEvaluation
from expo_bench.sweep.records import RunDirectoryKey, TrainingResult, display_name
from expo_bench.tracking import TrackedRun
from expo_bench.trainer import LAST, LastCheckpoint, LossHistory, RandomState, build_trainer, gathered_state_dict

RECORD = "record.json"
"""Written last into a run directory: its presence means the run finished training."""
CHECKPOINT = LAST
"""Lightning's checkpoint while the run trains (and, with ``train.keep: full``, its final state)."""
WEIGHTS = "weights.safetensors"
"""The policy's final weights, what every evaluation of the finished run loads (tensors only: loading runs no code)."""


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
    reference_samples: dict[str, Any] | None
    runs_dir: Path

    @property
    def name(self) -> str:
        return display_name(self.run.label, self.lam)

    @property
    def directory_key(self) -> RunDirectoryKey:
        return RunDirectoryKey(
            method_class=f"{self.run.method.__module__}:{self.run.method.__qualname__}",
            seed=self.seed,
            data_fingerprint=self.data_fingerprint,
            reference_fingerprint=self.reference_fingerprint,
            params=self.params.model_dump(mode="json"),
            train=self.run.train.result_settings(),
            lora=None if self.lora is None else self.lora.model_dump(),
            reference=self.reference,
            reference_samples=self.reference_samples,
        )

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.run.label)}-{digest(self.directory_key.as_json())}"

    @property
    def finished(self) -> bool:
        """Whether the run finished training (rank zero's answer, on every rank)."""
        return broadcast((self.run_dir / RECORD).exists())

    def policy(self, base: PreTrainedModel) -> PreTrainedModel:
        """A fresh copy of the SFT weights, LoRA-wrapped if asked."""
        return copy.deepcopy(base) if self.lora is None else self.lora.wrap(copy.deepcopy(base))

    def module(self, base: PreTrainedModel) -> PreferenceMethod:
        """The method's module around a fresh policy."""
        L.seed_everything(self.seed, verbose=False)
        policy = self.policy(base)
        if self.run.train.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        reference = None if self.run.method.reference_free else REFERENCES[self.reference](base, policy)
        return self.run.method(CausalLMScorer(policy), reference, [self.params], self.run.train.optimizer)

    def whole_module(self, trainer: L.Trainer, module: L.LightningModule, base: PreTrainedModel) -> PreferenceMethod:
        """The module in training with its weights whole on this rank: itself, or where its strategy shards them a fresh
        module (never set up by a Trainer) loaded with the weights gathered from every rank (a collective)."""
        state = gathered_state_dict(trainer)
        if state is None:
            return cast(PreferenceMethod, module)
        with torch.random.fork_rng():  # building a module seeds and draws (LoRA): leave training's RNG alone
            whole = self.module(base)
        whole.load_state_dict(state)
        return whole


def fit(
    unit: FitUnit,
    base: PreTrainedModel,
    data: PairData,
    evaluator: Evaluator | None,
    every_n_steps: int | None,
    tracked: TrackedRun,
    console: Console,
) -> tuple[TrainingResult, dict[str, float] | None] | None:
    """Train (or reuse, or resume) ``unit``, evaluate it, and record both in ``tracked``; None when it diverged (then
    recorded as failed, with the reason)."""
    with _owned(unit, tracked), _failure_recorded(unit, tracked, console):
        policy = None
        if unit.finished:
            console.print(f"  {unit.name}: finished in an earlier run, reusing {unit.run_dir / RECORD}")
            training = TrainingResult.read(unit.run_dir / RECORD)
        else:
            periodic = None
            if evaluator is not None and every_n_steps is not None:
                where = unit.run_dir / "evaluation-during-training"
                periodic = PeriodicEvaluation(
                    evaluator,
                    every_n_steps,
                    where,
                    {"method": unit.name},
                    lambda trainer, module: policy_model(unit.whole_module(trainer, module, base)),
                )
            policy, training = _train(unit, base, data, periodic, tracked, console)
        evaluation = None
        if evaluator is not None:
            if policy is None and not evaluator.has_result(unit.run_dir):
                policy = policy_model(_restore(unit, base, training))
            evaluation = evaluate(evaluator, unit.name, policy, unit.run_dir, console)
        if not tracked.complete:
            tracked.log_metrics(training.eval_after | (evaluation or {}))
            done = [unit.run_dir / RECORD] + ([] if evaluator is None else [evaluator.results_dir(unit.run_dir)])
            tracked.log_artifacts(done)
            tracked.mark_complete()
        if unit.run.train.keep == "none" and is_global_zero():
            for name in (WEIGHTS, CHECKPOINT):
                (unit.run_dir / name).unlink(missing_ok=True)
        return training, evaluation
    return None


@contextmanager
def _owned(unit: FitUnit, tracked: TrackedRun) -> Iterator[None]:
    """Work on the run only while no other process does: another sweep on the same store waits, then finds the run as
    that one left it (each rank holds its own lock, so the ranks of one DDP job never wait for each other)."""
    rank = getattr(rank_zero_only, "rank", 0)
    lock = unit.runs_dir / f".{unit.run_dir.name}.rank{rank}.lock"  # beside the run: Lightning wants its folder to itself
    with locked(lock, f"{unit.name} (another process is training it)"):
        tracked.refresh()
        yield


@contextmanager
def _failure_recorded(unit: FitUnit, tracked: TrackedRun, console: Console) -> Iterator[None]:
    """A diverged run ends here: said, and recorded as failed (never complete: never reused nor ranked)."""
    try:
        yield
    except DivergedError as error:
        console.print(f"  {unit.name}: [bold red]failed[/]: {error}")
        tracked.mark_failed(str(error))


def _train(
    unit: FitUnit,
    base: PreTrainedModel,
    data: PairData,
    periodic: PeriodicEvaluation | None,
    tracked: TrackedRun,
    console: Console,
) -> tuple[PreTrainedModel, TrainingResult]:
    """Train ``unit`` on every rank; its policy with whole weights, and what training measured."""
    train, run_dir = unit.run.train, unit.run_dir
    history = LossHistory()
    checkpoints = LastCheckpoint(run_dir, train.checkpoint_every_n_steps)
    callbacks: list[Callback] = [history, RandomState(), checkpoints, RichProgressBar(leave=False)]
    if periodic is not None:
        callbacks.append(periodic)
    trainer = build_trainer(train, callbacks, logger=tracked.logger(), blocks=transformer_blocks(base), enable_checkpointing=True)
    # each Trainer stage gets a module no stage has set up: FSDP leaves a module it wrapped unusable for the next
    before = trainer.validate(unit.module(base), datamodule=data, verbose=False)[0]
    module = unit.module(base)
    resume = run_dir / CHECKPOINT
    resuming = broadcast(resume.exists())
    if resuming:
        console.print(f"  {unit.name}: resuming from {resume}")
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume if resuming else None, weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_file(resume, error) from None
    seconds = time.perf_counter() - started
    trained = unit.whole_module(trainer, module, base)
    require_finite_weights(trained)
    # a sharding strategy wraps what it validates: validate a copy, keep the whole module for evaluation
    after = trainer.validate(trained if trained is module else copy.deepcopy(trained), datamodule=data, verbose=False)[0]
    if not_finite := [key for key, value in after.items() if not math.isfinite(value)]:
        raise DivergedError(
            f"{trained.method_name}: non-finite held-out {', '.join(not_finite)} after step {trainer.global_step}"
        )
    accuracy = (
        metric_keys.VAL_REWARDS_ACCURACY if metric_keys.VAL_REWARDS_ACCURACY.key in after else metric_keys.VAL_PREFERENCE_ACCURACY
    )
    console.print(
        f"  {unit.name}: {trainer.global_step} steps in {seconds:.1f} s; held-out loss "
        f"{before[metric_keys.VAL_LOSS.key]:.4f} -> {after[metric_keys.VAL_LOSS.key]:.4f}, "
        f"{accuracy.name} {after[accuracy.key]:.3f}"
    )
    if is_global_zero():
        atomic_write(run_dir / WEIGHTS, lambda path: save_model(policy_model(trained), str(path)))
    weights_sha256 = broadcast(file_sha256(run_dir / WEIGHTS) if is_global_zero() else "")
    if train.keep == "full":
        trainer.save_checkpoint(resume)  # the final state, not the last periodic save
    training = TrainingResult(
        steps=trainer.global_step,
        train_seconds=round(seconds, 3),
        eval_before=dict(before),
        eval_after=dict(after),
        loss_history=history.losses,
        eval_history=[] if periodic is None else periodic.history,
        weights=WEIGHTS,
        weights_step=trainer.global_step,
        grad_norm_history=history.grad_norms,
        weights_sha256=weights_sha256,
    )
    if is_global_zero():
        record = {"method": unit.run.label, "lam": unit.lam, **unit.directory_key.as_json(), **asdict(training)}
        sealed_write(run_dir / RECORD, json.dumps(record, indent=2))  # written last: its presence means the run finished
        if train.keep != "full":
            resume.unlink(missing_ok=True)  # optimizer state is for resuming only
    return policy_model(trained), training


def _restore(unit: FitUnit, base: PreTrainedModel, training: TrainingResult) -> PreferenceMethod:
    """A finished run's trained module, from its final weights (safetensors: tensors only, no code runs)."""
    module = unit.module(base)
    weights = unit.run_dir / (training.weights or WEIGHTS)
    if weights.exists():
        if training.weights_sha256 and file_sha256(weights) != training.weights_sha256:
            raise UserError(
                f"{weights}: not the weights {unit.name} finished with (their sha256 differs from the one in its "
                f"{RECORD}: swapped or edited?); delete {unit.run_dir} to retrain it"
            )
        try:
            load_model(policy_model(module), str(weights))
        except (SafetensorError, RuntimeError) as error:
            raise UserError(
                f"{weights}: not the final weights of {unit.name} ({error}); delete {unit.run_dir} to retrain it"
            ) from None
        return module
    # a run recorded before final weights were kept: its last checkpoint, loaded as tensors and plain data only, and
    # only if it holds the final step (with checkpoint_every_n_steps the last save can precede the end)
    checkpoint = unit.run_dir / CHECKPOINT
    if not checkpoint.exists():
        raise UserError(
            f"{unit.name} finished at step {training.steps} but kept no weights in {unit.run_dir} (train.keep: none?): "
            "delete that folder to train it again"
        )
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_file(checkpoint, error) from None
    if state.get("global_step") != training.steps:
        raise UserError(
            f"{checkpoint} holds step {state.get('global_step')} but {unit.name} finished at step {training.steps}: its "
            f"final weights were not kept; delete {unit.run_dir} to train it again"
        )
    module.load_state_dict(state["state_dict"])
    return module


def evaluate(
    evaluator: Evaluator, name: str, policy: PreTrainedModel | None, run_dir: Path, console: Console
) -> dict[str, float]:
    """A run's metrics under ``evaluator`` (computed at most once), with its headline printed."""
    metrics, hit = evaluator.evaluate_once(policy, run_dir, {"method": name, "run": run_dir.name}, console)
    headline = ", ".join(f"{metric.name} {metrics[metric.key]:.3f}" for metric in metric_keys.HEADLINE if metric.key in metrics)
    console.print(f"  {name}: {'evaluated in an earlier run' if hit else 'evaluated'}: {headline}")
    return metrics
