"""Preference optimization of causal LMs: a task prepares pairs and its SFT stage, then every method runs from it."""

from __future__ import annotations

import copy
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from pydantic import Field, model_validator
from rich.console import Console
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from expo_bench import metric_keys, reporting
from expo_bench.cache import cached, digest
from expo_bench.config_model import ConfigModel
from expo_bench.errors import UserError
from expo_bench.evaluation.judges import Judge
from expo_bench.lm import report
from expo_bench.lm.data import (
    PairData,
    PairDataset,
    fingerprint_module,
    fingerprint_pairs,
    reference_logps,
    reference_sample_logps,
)
from expo_bench.lm.evaluation import EvaluationConfig, Evaluator, ExactMetrics, HeldOutPrompts, PeriodicEvaluation, strip_eos
from expo_bench.lm.hh import HUB_ID, PromptPair, load_hh_pairs
from expo_bench.lm.model import (
    AdapterDisabledScorer,
    CachedReference,
    CausalLMScorer,
    LoraSettings,
    ModelConfig,
    accelerator_device,
    count_parameters,
    policy_model,
)
from expo_bench.lm.sampling import SamplingConfig, sample_responses
from expo_bench.lm.sft import SupervisedFineTuning
from expo_bench.lm.tokenize import TokenizationConfig, TokenizedPair, fingerprint_tokenizer, pad_token_id, tokenize_pair
from expo_bench.methods.base import PreferenceMethod
from expo_bench.training import TrainConfig, build_trainer

if TYPE_CHECKING:
    from expo_bench.recipe import Experiment, MethodRun
    from expo_bench.tracking import RunLog, TrackedRun


@dataclass(frozen=True)
class Prepared:
    """A task's data for one seed, after its SFT stage: tokenized training and held-out pairs."""

    train: list[TokenizedPair]
    evaluation: list[TokenizedPair]
    provenance: dict[str, Any]
    judge: Judge | None = None
    """The task's own ground-truth judge (a reward model, an oracle), used when the recipe names none."""
    exact: ExactMetrics | None = None


class LanguageModelTask(ConfigModel):
    """What every language-model task shares: model, tokenizer, SFT, reference handling, LoRA.

    A subclass names its ``kind`` and implements :meth:`prepare`: its data and its SFT stage.
    """

    tokenizer: str
    tokenization: TokenizationConfig = TokenizationConfig()
    model: ModelConfig
    sft: TrainConfig | None = None
    """Supervised fine-tuning first; its result is the reference and every method's start."""
    reference_samples: SamplingConfig | None = None
    """Sample responses from the reference (the SFT model) once per seed and cache them: EXPO's
    ``kl_estimator: reference_samples`` estimates KL(π_ref ‖ π) on them."""
    lora: LoraSettings | None = None
    """Train a LoRA adapter on the policy instead of all its weights."""
    reference: Literal["cached", "frozen_copy", "adapter_disabled"] = "cached"
    """``cached``: reference log-probs computed once per seed, reused by every method, no reference in
    memory; ``frozen_copy``: a frozen copy runs forward on every batch; ``adapter_disabled``: the policy
    with its LoRA adapter switched off (needs ``lora``), no second copy."""

    evaluation: EvaluationConfig | None = None
    """Sample every trained policy on held-out prompts and judge the samples (win rate, diversity, reward, KL)."""
    has_own_judge: ClassVar[bool] = False
    """Whether :meth:`prepare` supplies a ground-truth judge, so ``evaluation.judge`` may be left unset."""
    rank_by: ClassVar[tuple[str, str]] = (metric_keys.WIN_RATE, "max")
    """The metric (and whether higher or lower is better) that picks a method's best configuration."""

    @model_validator(mode="after")
    def _lora_reference(self) -> LanguageModelTask:
        if self.reference == "adapter_disabled" and self.lora is None:
            raise ValueError("reference 'adapter_disabled' needs a LoRA policy: add lora: {r: 16}")
        if self.evaluation is not None and self.evaluation.judge is None and not self.has_own_judge:
            raise ValueError("this task has no ground-truth judge of its own: set evaluation.judge (kind: llm or reward_model)")
        return self

    def prepare(self, seed: int, tokenizer: Any, base: PreTrainedModel, cache_dir: Path, console: Console) -> Prepared:
        """Load and tokenize this seed's pairs and run the SFT stage on ``base`` (in place)."""
        raise NotImplementedError

    def load_tokenizer(self) -> Any:
        return AutoTokenizer.from_pretrained(self.tokenizer)

    @property
    def dataset(self) -> str:
        """The dataset's name in the tracking store: the leaderboard has one table per dataset."""
        raise NotImplementedError

    def _tags(
        self,
        method: str,
        method_class: str,
        seed: int,
        configuration: dict[str, Any],
        fingerprints: dict[str, Any],
        evaluator: Evaluator | None,
    ) -> dict[str, str]:
        from expo_bench import tracking  # MLflow loads only when runs are recorded: validate stays fast

        rank_metric, goal = self.rank_by if evaluator is not None else (metric_keys.VAL_PREFERENCE_ACCURACY, "max")
        tiny = self.model.tiny or {}
        return {
            tracking.METHOD: method,
            tracking.METHOD_CLASS: method_class,
            tracking.DATASET: self.dataset,
            tracking.MODEL: self.model.name_or_path or f"tiny {tiny.get('model_type')}",
            tracking.SEED: str(seed),
            tracking.DATA_FINGERPRINT: fingerprints["data_fingerprint"],
            tracking.MODEL_FINGERPRINT: fingerprints["reference_fingerprint"],
            tracking.CONFIG_KEY: digest(configuration),
            tracking.RANK_METRIC: rank_metric,
            tracking.RANK_GOAL: goal,
        } | ({} if evaluator is None else {tracking.JUDGE: evaluator.judge.name})

    def _record_run(
        self, runs: RunLog, run_dir: Path, method: str, identity: dict[str, Any], evaluator: Evaluator | None
    ) -> TrackedRun:
        """The tracking-store run of one trained (or reference) policy under one evaluation."""
        evaluation = None if evaluator is None else evaluator.identity()
        # seeds of one configuration differ in their data and SFT weights too, so fingerprints stay out of its key
        varying = {"seed", "data_fingerprint", "reference_fingerprint"}
        configuration = {key: value for key, value in identity.items() if key not in varying} | {"evaluation": evaluation}
        params = {"method": method, **identity}
        if evaluator is not None:
            params["evaluation"] = evaluator.config.model_dump(mode="json")
        lam = "" if identity.get("lam") is None else f" λ={identity['lam']:g}"
        tags = self._tags(method, identity["method_class"], identity["seed"], configuration, identity, evaluator)
        return runs.child(f"{run_dir.name}/{evaluation}", f"{method}{lam} s{identity['seed']}", params, tags)

    def provides(self) -> frozenset[str]:
        """Optional batch fields the data carries: reference samples when ``reference_samples`` is set."""
        return frozenset({"kl_samples"}) if self.reference_samples is not None else frozenset()

    def run(self, experiment: Experiment, console: Console, cache_dir: Path, runs: RunLog) -> list[dict[str, Any]]:
        """SFT, then every method from the SFT weights; shared reference work is cached under ``cache_dir``."""
        tokenizer = self.load_tokenizer()
        records: list[dict[str, Any]] = []
        for seed in experiment.recipe.seeds:
            records += self._run_seed(experiment, tokenizer, seed, cache_dir, runs, console)
        return records

    def _run_seed(
        self, experiment: Experiment, tokenizer: Any, seed: int, cache_dir: Path, runs: RunLog, console: Console
    ) -> list[dict[str, Any]]:
        pad = pad_token_id(tokenizer)
        L.seed_everything(seed, verbose=False)
        base = self.model.build(vocab_size=len(tokenizer))
        prepared = self.prepare(seed, tokenizer, base, cache_dir, console)
        train, evaluation = prepared.train, prepared.evaluation
        provenance: dict[str, Any] = {
            "data_fingerprint": fingerprint_pairs(train + evaluation),
            "tokenizer_fingerprint": fingerprint_tokenizer(tokenizer),
            "train_pairs": len(train),
            "eval_pairs": len(evaluation),
            "truncated_prompts": sum(pair.prompt_truncated for pair in train + evaluation),
            "truncated_responses": sum(pair.response_truncated for pair in train + evaluation),
            "reference_fingerprint": fingerprint_module(base),
            "parameters": count_parameters(base),
            **prepared.provenance,
        }
        console.print(f"seed {seed}: {provenance}")
        datasets = PairDataset(train, pad), PairDataset(evaluation, pad)
        key = {"reference": provenance["reference_fingerprint"], "data": provenance["data_fingerprint"]}
        nn.Module.to(base, accelerator_device())
        if self.reference_samples is not None:  # first: the cached reference log-probs cover the samples too
            key |= {"sampling": self.reference_samples.model_dump(), "seed": seed}
            self._cache_reference_samples(
                base, datasets, self.reference_samples, tokenizer.eos_token_id, seed, key, cache_dir, console
            )
        if self.reference == "cached":
            self._cache_reference_logps(base, datasets, experiment.runs[0].train.batch_size, key, cache_dir, console)
        base.cpu()
        records = []
        fingerprints = {name: provenance[name] for name in ("data_fingerprint", "reference_fingerprint")}
        runs_dir = cache_dir.parent / "runs"
        units = [
            FitUnit(run, params, None if run.lam is None else run.lam[index], seed, fingerprints, runs_dir)
            for run in experiment.runs
            for index, params in enumerate(run.grid)
        ]
        if self.evaluation is not None and self.evaluation.evaluate_only:
            missing = [unit for unit in units if not (self._run_dir(unit) / "record.json").exists()]
            if missing:
                raise UserError(
                    "evaluate_only, but these runs have not finished training (seed "
                    f"{seed}): {', '.join(f'{unit.name} under {self._run_dir(unit)}' for unit in missing)}; "
                    "train them first (task.evaluation.evaluate_only: false)"
                )
        evaluator = None if self.evaluation is None else self._evaluator(prepared, tokenizer, base, seed, cache_dir)
        if evaluator is not None:
            records.append(self._evaluate_reference(evaluator, seed, fingerprints, runs_dir, runs, console) | provenance)
        for unit in units:
            data = PairData(*datasets, batch_size=unit.run.train.batch_size, seed=seed)
            records.append(self._fit(unit, base, data, evaluator, runs, console) | provenance)
        return records

    def _run_dir(self, unit: FitUnit) -> Path:
        identity = unit.identity(self.lora, self.reference)
        return unit.runs_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', unit.run.label)}-{digest(identity)}"

    def _evaluator(self, prepared: Prepared, tokenizer: Any, base: PreTrainedModel, seed: int, cache_dir: Path) -> Evaluator:
        """Judge and held-out prompts (each distinct prompt once, with its first chosen response)."""
        config = self.evaluation
        assert config is not None
        judge = prepared.judge if config.judge is None else config.judge.build(cache_dir / "judgments", seed)
        assert judge is not None, "the recipe validator requires a judge for tasks without their own"
        first_pairs = list({tuple(pair.prompt_ids): pair for pair in reversed(prepared.evaluation)}.values())[::-1]
        pairs = first_pairs[: config.prompts]
        eos = tokenizer.eos_token_id
        held_out = HeldOutPrompts(
            [pair.prompt_ids for pair in pairs],
            [tokenizer.decode(pair.prompt_ids) for pair in pairs],
            [strip_eos(pair.chosen_ids, eos) for pair in pairs],
        )
        return Evaluator(config, tokenizer, base, held_out, judge, seed, cache_dir, prepared.exact)

    def _evaluate_reference(
        self, evaluator: Evaluator, seed: int, fingerprints: dict[str, str], runs_dir: Path, runs: RunLog, console: Console
    ) -> dict[str, Any]:
        """The SFT reference evaluated like a method: the frontier's origin and the win rate of "no optimization"."""
        identity = {"method_class": "reference", "seed": seed, **fingerprints}
        run_dir = runs_dir / f"{REFERENCE_LABEL}-{digest(identity)}"
        tracked = self._record_run(runs, run_dir, REFERENCE_LABEL, identity, evaluator)
        metrics = self._evaluate(evaluator, REFERENCE_LABEL, evaluator.reference, run_dir, console)
        if not tracked.complete:
            tracked.log_metrics(metrics)
            tracked.log_artifacts([evaluator.results_dir(run_dir)])
            tracked.mark_complete()
        return {"method": REFERENCE_LABEL, "lam": None, **identity, "params": {}, "eval": metrics}

    def _cache_reference_logps(
        self,
        base: PreTrainedModel,
        datasets: tuple[PairDataset, PairDataset],
        batch_size: int,
        key: dict[str, Any],
        cache_dir: Path,
        console: Console,
    ) -> None:
        """Reference log-probs of every pair, and of every reference sample when there are samples."""
        device = next(base.parameters()).device
        scorer = CausalLMScorer(base).eval()

        def compute() -> dict[str, Any]:
            pairs = torch.cat([reference_logps(scorer, dataset, batch_size, device) for dataset in datasets])
            if datasets[0].reference_samples is None:
                return {"pairs": pairs, "samples": None}
            return {
                "pairs": pairs,
                "samples": [reference_sample_logps(scorer, dataset, batch_size, device) for dataset in datasets],
            }

        values, hit = cached(cache_dir, "reference-logps", key, compute)
        logps, split = values["pairs"], len(datasets[0])
        datasets[0].reference_logps, datasets[1].reference_logps = logps[:split], logps[split:]
        if values["samples"] is not None:
            datasets[0].reference_sample_logps, datasets[1].reference_sample_logps = values["samples"]
        console.print(
            f"reference log-probs of {len(logps)} pairs: {'from the cache' if hit else 'computed once for every method'}"
        )

    def _cache_reference_samples(
        self,
        base: PreTrainedModel,
        datasets: tuple[PairDataset, PairDataset],
        sampling: SamplingConfig,
        eos: int,
        seed: int,
        key: dict[str, Any],
        cache_dir: Path,
        console: Console,
    ) -> None:
        prompts = [pair.prompt_ids for dataset in datasets for pair in dataset.pairs]

        def compute() -> list[list[list[int]]]:
            return sample_responses(base, prompts, sampling, datasets[0].pad_token_id, eos, seed)

        samples, hit = cached(cache_dir, "reference-samples", key, compute)
        split = len(datasets[0])
        datasets[0].reference_samples, datasets[1].reference_samples = samples[:split], samples[split:]
        console.print(f"{sampling.samples_per_prompt} reference samples per prompt: {'from the cache' if hit else 'drawn once'}")

    def _sft(
        self,
        base: PreTrainedModel,
        train: list[TokenizedPair],
        evaluation: list[TokenizedPair],
        pad: int,
        seed: int,
        cache_dir: Path,
        console: Console,
    ) -> dict[str, Any]:
        """Fine-tune ``base`` in place on the chosen responses; the result is cached, keyed by the initial
        weights, the data, the SFT settings and the seed, so a rerun or a later sweep loads it instead."""
        sft = self.sft
        assert sft is not None
        key = {
            "initial": fingerprint_module(base),
            "data": fingerprint_pairs(train + evaluation),
            "sft": sft.model_dump(mode="json"),
            "seed": seed,
        }

        def compute() -> dict[str, Any]:
            module = SupervisedFineTuning(CausalLMScorer(base), sft.optimizer)
            data = PairData(PairDataset(train, pad), PairDataset(evaluation, pad), sft.batch_size, seed)
            trainer = build_trainer(sft, [RichProgressBar(leave=False)])
            before = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val_nll"]
            started = time.perf_counter()
            trainer.fit(module, datamodule=data)
            after = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val_nll"]
            base.cpu()
            return {
                "weights": {name: tensor.detach().clone() for name, tensor in base.state_dict().items()},
                "metrics": {"sft_val_nll_before": before, "sft_val_nll_after": after, "sft_steps": trainer.global_step},
                "seconds": time.perf_counter() - started,
            }

        result, hit = cached(cache_dir, "sft", key, compute)
        if hit:
            base.load_state_dict(result["weights"])
        metrics = result["metrics"]
        console.print(
            f"  SFT: held-out NLL per token {metrics['sft_val_nll_before']:.3f} -> {metrics['sft_val_nll_after']:.3f} "
            f"in {metrics['sft_steps']} steps, " + ("from the cache" if hit else f"{result['seconds']:.1f} s")
        )
        return dict(metrics)

    def _fit(
        self, unit: FitUnit, base: PreTrainedModel, data: PairData, evaluator: Evaluator | None, runs: RunLog, console: Console
    ) -> dict[str, Any]:
        """Train one (method, λ, seed), checkpointing under its run directory, then evaluate it: a finished
        run is reused, a checkpointed one resumed, and evaluations are kept per evaluation config."""
        identity, run_dir = unit.identity(self.lora, self.reference), self._run_dir(unit)
        tracked = self._record_run(runs, run_dir, unit.run.label, identity | {"lam": unit.lam}, evaluator)
        module = None
        if (run_dir / "record.json").exists():
            console.print(f"  {unit.name}: finished in an earlier run, reusing {run_dir / 'record.json'}")
            record = dict(json.loads((run_dir / "record.json").read_text()))
        else:
            module, record = self._train(unit, identity, base, data, run_dir, evaluator, tracked, console)
        if evaluator is not None:
            if module is None and not evaluator.has_result(run_dir):
                module = self._restore(unit, base, run_dir)
            record["eval"] = self._evaluate(
                evaluator, unit.name, None if module is None else policy_model(module), run_dir, console
            )
        if not tracked.complete:
            tracked.log_metrics(record["eval_after"] | record.get("eval", {}))
            done = [run_dir / "record.json"] + ([] if evaluator is None else [evaluator.results_dir(run_dir)])
            tracked.log_artifacts(done)
            tracked.mark_complete()
        return record

    def _train(
        self,
        unit: FitUnit,
        identity: dict[str, Any],
        base: PreTrainedModel,
        data: PairData,
        run_dir: Path,
        evaluator: Evaluator | None,
        tracked: TrackedRun,
        console: Console,
    ) -> tuple[PreferenceMethod, dict[str, Any]]:
        run = unit.run
        module = self._module(unit, base)
        history = LossHistory()
        checkpoints = ModelCheckpoint(
            dirpath=run_dir, filename="last", enable_version_counter=False, every_n_train_steps=run.train.checkpoint_every_n_steps
        )
        callbacks: list[Callback] = [history, checkpoints, RichProgressBar(leave=False)]
        every = None if self.evaluation is None else self.evaluation.every_n_steps
        periodic = None
        if evaluator is not None and every is not None:
            periodic = PeriodicEvaluation(evaluator, every, run_dir / "evaluation-during-training", {"method": unit.name})
            callbacks.append(periodic)
        trainer = build_trainer(run.train, callbacks, logger=tracked.logger(), enable_checkpointing=True)
        before = trainer.validate(module, datamodule=data, verbose=False)[0]
        resume = run_dir / "last.ckpt"
        if resume.exists():
            console.print(f"  {unit.name}: resuming from {resume}")
        started = time.perf_counter()
        trainer.fit(module, datamodule=data, ckpt_path=resume if resume.exists() else None)
        seconds = time.perf_counter() - started
        after = trainer.validate(module, datamodule=data, verbose=False)[0]
        accuracy = "rewards_accuracy" if "val/rewards_accuracy" in after else "preference_accuracy"
        console.print(
            f"  {unit.name}: {trainer.global_step} steps in {seconds:.1f} s; held-out loss "
            f"{before['val/loss']:.4f} -> {after['val/loss']:.4f}, {accuracy} {after[f'val/{accuracy}']:.3f}"
        )
        record = {
            "method": run.label,
            "lam": unit.lam,
            **identity,
            "steps": trainer.global_step,
            "train_seconds": round(seconds, 3),
            "eval_before": before,
            "eval_after": after,
            "loss_history": history.losses,
            "eval_history": [] if periodic is None else periodic.history,
            "checkpoint": str(resume),
        }
        partial = run_dir / "record.json.partial"
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(run_dir / "record.json")  # written last: its presence means the run finished
        return module, record

    def _module(self, unit: FitUnit, base: PreTrainedModel) -> PreferenceMethod:
        """The method's module around a fresh copy of the SFT weights (LoRA-wrapped if asked)."""
        L.seed_everything(unit.seed, verbose=False)
        policy = copy.deepcopy(base) if self.lora is None else self.lora.wrap(copy.deepcopy(base))
        reference = None if unit.run.method.reference_free else REFERENCES[self.reference](base, policy)
        return unit.run.method(CausalLMScorer(policy), reference, [unit.params], unit.run.train.optimizer)

    def _restore(self, unit: FitUnit, base: PreTrainedModel, run_dir: Path) -> PreferenceMethod:
        """A finished run's trained module, from its last checkpoint."""
        module = self._module(unit, base)
        checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=False)
        module.load_state_dict(checkpoint["state_dict"])
        return module

    def _evaluate(
        self, evaluator: Evaluator, name: str, policy: PreTrainedModel | None, run_dir: Path, console: Console
    ) -> dict[str, float]:
        metrics, hit = evaluator.evaluate_once(policy, run_dir, {"method": name, "run": run_dir.name})
        headline = ", ".join(
            f"{key.removeprefix('eval/')} {metrics[key]:.3f}"
            for key in (metric_keys.WIN_RATE, metric_keys.REWARD, metric_keys.KL, metric_keys.KL_TO_TARGET)
            if key in metrics
        )
        console.print(f"  {name}: {'evaluated in an earlier run' if hit else 'evaluated'}: {headline}")
        return metrics

    def report(self, experiment: Experiment, records: list[dict[str, Any]], out_dir: Path, console: Console) -> list[Path]:
        name = experiment.recipe.experiment
        trained = [record for record in records if "eval_after" in record]
        rows = report.metric_rows(trained)
        console.print(report.rich_table(f"{name}: held-out pairs after training", rows))
        text = f"# {name}: held-out pairs after training\n\n" + report.markdown_table(rows)
        header, evaluated = report.evaluation_table(records)
        if evaluated:
            console.print(reporting.rich_table(f"{name}: sampled evaluation", header, evaluated))
            text += f"\n## Sampled evaluation\n\n{reporting.markdown_table(header, evaluated)}"
        table = out_dir / "methods.md"
        table.write_text(text)
        curves = out_dir / "training.png"
        report.plot_training(trained, curves)
        return [table, curves]


REFERENCES: dict[str, Callable[[PreTrainedModel, PreTrainedModel], nn.Module]] = {
    "cached": lambda base, policy: CachedReference(),
    "frozen_copy": lambda base, policy: CausalLMScorer(copy.deepcopy(base)),
    "adapter_disabled": lambda base, policy: AdapterDisabledScorer(policy),
}
"""How the reference is built from the SFT model (``base``) and the policy about to be trained."""


class HHTask(LanguageModelTask):
    """Anthropic HH pairs from the hub (``source: Anthropic/hh-rlhf``) or a local file or folder; SFT on
    the chosen responses ("Preferred-FT", the DPO paper's reference).

    When ``eval_split`` equals ``train_split`` (local test splits), the pairs are shuffled once by seed
    and cut into disjoint training and held-out slices.
    """

    kind: Literal["hh"]
    tokenizer: str = "EleutherAI/pythia-2.8b"
    source: str = HUB_ID
    data_dir: str | None = "helpful-base"
    train_split: str = "train"
    eval_split: str = "test"
    max_train_pairs: int | None = Field(None, gt=0)
    max_eval_pairs: int | None = Field(None, gt=0)
    skip_malformed: bool = False

    @model_validator(mode="after")
    def _source_exists(self) -> HHTask:
        if self.source != HUB_ID and not Path(self.source).exists():
            raise ValueError(f"source {self.source!r} is neither an existing file or folder nor the hub id {HUB_ID!r}")
        return self

    @property
    def dataset(self) -> str:
        return "hh-rlhf" if self.data_dir is None else f"hh-rlhf/{self.data_dir}"

    def _pairs(self, seed: int) -> tuple[list[PromptPair], list[PromptPair], list[str]]:
        train, train_report = load_hh_pairs(self.source, self.data_dir, self.train_split, self.skip_malformed)
        notes = [f"{self.train_split}: {train_report.summary()}"]
        if self.eval_split == self.train_split:
            random.Random(seed).shuffle(train)
            held_out = self.max_eval_pairs or max(1, len(train) // 10)
            evaluation, train = train[:held_out], train[held_out:]
        else:
            evaluation, eval_report = load_hh_pairs(self.source, self.data_dir, self.eval_split, self.skip_malformed)
            notes.append(f"{self.eval_split}: {eval_report.summary()}")
        return train[: self.max_train_pairs], evaluation[: self.max_eval_pairs], notes

    def prepare(self, seed: int, tokenizer: Any, base: PreTrainedModel, cache_dir: Path, console: Console) -> Prepared:
        train_pairs, eval_pairs, notes = self._pairs(seed)
        for note in notes:
            console.print(f"seed {seed}: {note}")
        train = [tokenize_pair(tokenizer, pair, self.tokenization) for pair in train_pairs]
        evaluation = [tokenize_pair(tokenizer, pair, self.tokenization) for pair in eval_pairs]
        pad = pad_token_id(tokenizer)
        sft = self._sft(base, train, evaluation, pad, seed, cache_dir, console) if self.sft else {}
        return Prepared(train, evaluation, sft)


REFERENCE_LABEL = "sft-reference"
"""How the SFT reference appears among the methods when it is evaluated."""


@dataclass(frozen=True)
class FitUnit:
    """One (method, hyperparameters, seed) to train: what identifies its run directory."""

    run: MethodRun
    params: Any
    lam: float | None
    seed: int
    fingerprints: dict[str, str]
    runs_dir: Path

    @property
    def name(self) -> str:
        return self.run.label + ("" if self.lam is None else f" λ={self.lam:g}")

    def identity(self, lora: LoraSettings | None, reference: str) -> dict[str, Any]:
        return {
            "method_class": f"{self.run.method.__module__}:{self.run.method.__qualname__}",
            "params": self.params.model_dump(mode="json"),
            "train": self.run.train.model_dump(mode="json"),
            "seed": self.seed,
            "lora": None if lora is None else lora.model_dump(),
            "reference": reference,
            **self.fingerprints,
        }


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
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and trainer.global_step % trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            self.losses.append((trainer.global_step, float(loss)))
