"""Preference optimization of causal LMs: a task prepares pairs and its SFT stage, then every method runs from it."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from pydantic import Field, model_validator
from rich.console import Console
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from expo_bench.cache import cached
from expo_bench.config_model import ConfigModel
from expo_bench.lm import report
from expo_bench.lm.data import (
    PairData,
    PairDataset,
    fingerprint_module,
    fingerprint_pairs,
    reference_logps,
    reference_sample_logps,
)
from expo_bench.lm.hh import HUB_ID, PromptPair, load_hh_pairs
from expo_bench.lm.model import (
    AdapterDisabledScorer,
    CachedReference,
    CausalLMScorer,
    LoraSettings,
    ModelConfig,
    accelerator_device,
    count_parameters,
)
from expo_bench.lm.sampling import SamplingConfig, sample_responses
from expo_bench.lm.sft import SupervisedFineTuning
from expo_bench.lm.tokenize import TokenizationConfig, TokenizedPair, fingerprint_tokenizer, pad_token_id, tokenize_pair
from expo_bench.training import TrainConfig, build_trainer

if TYPE_CHECKING:
    from expo_bench.recipe import Experiment, MethodRun


@dataclass(frozen=True)
class Prepared:
    """A task's data for one seed, after its SFT stage: tokenized training and held-out pairs."""

    train: list[TokenizedPair]
    evaluation: list[TokenizedPair]
    provenance: dict[str, Any]


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

    @model_validator(mode="after")
    def _lora_reference(self) -> LanguageModelTask:
        if self.reference == "adapter_disabled" and self.lora is None:
            raise ValueError("reference 'adapter_disabled' needs a LoRA policy: add lora: {r: 16}")
        return self

    def prepare(self, seed: int, tokenizer: Any, base: PreTrainedModel, cache_dir: Path, console: Console) -> Prepared:
        """Load and tokenize this seed's pairs and run the SFT stage on ``base`` (in place)."""
        raise NotImplementedError

    def provides(self) -> frozenset[str]:
        """Optional batch fields the data carries: reference samples when ``reference_samples`` is set."""
        return frozenset({"kl_samples"}) if self.reference_samples is not None else frozenset()

    def run(self, experiment: Experiment, console: Console, cache_dir: Path) -> list[dict[str, Any]]:
        """SFT, then every method from the SFT weights; shared reference work is cached under ``cache_dir``."""
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
        records: list[dict[str, Any]] = []
        for seed in experiment.recipe.seeds:
            records += self._run_seed(experiment, tokenizer, seed, cache_dir, console)
        return records

    def _run_seed(
        self, experiment: Experiment, tokenizer: Any, seed: int, cache_dir: Path, console: Console
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
        for run in experiment.runs:
            for index, params in enumerate(run.grid):
                lam = None if run.lam is None else run.lam[index]
                data = PairData(*datasets, batch_size=run.train.batch_size, seed=seed)
                records.append(
                    self._fit(run, params, lam, base, data, seed, fingerprints, cache_dir.parent / "runs", console) | provenance
                )
        return records

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
        console: Console,
    ) -> dict[str, Any]:
        assert self.sft is not None
        module = SupervisedFineTuning(CausalLMScorer(base), self.sft.optimizer)
        data = PairData(PairDataset(train, pad), PairDataset(evaluation, pad), self.sft.batch_size, seed)
        trainer = build_trainer(self.sft, [RichProgressBar(leave=False)])
        before = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val_nll"]
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        after = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val_nll"]
        seconds = time.perf_counter() - started
        console.print(
            f"  SFT: held-out NLL per token {before:.3f} -> {after:.3f} in {trainer.global_step} steps, {seconds:.1f} s"
        )
        base.cpu()
        return {"sft_val_nll_before": before, "sft_val_nll_after": after, "sft_steps": trainer.global_step}

    def _fit(
        self,
        run: MethodRun,
        params: Any,
        lam: float | None,
        base: PreTrainedModel,
        data: PairData,
        seed: int,
        fingerprints: dict[str, str],
        runs_dir: Path,
        console: Console,
    ) -> dict[str, Any]:
        """Train one (method, λ, seed), checkpointing under ``runs_dir``: a finished run is reused, a
        checkpointed one resumed."""
        identity = {
            "method_class": f"{run.method.__module__}:{run.method.__qualname__}",
            "params": params.model_dump(mode="json"),
            "train": run.train.model_dump(mode="json"),
            "seed": seed,
            "lora": None if self.lora is None else self.lora.model_dump(),
            "reference": self.reference,
            **fingerprints,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        run_dir = runs_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run.label)}-{digest}"
        lam_text = "" if lam is None else f" λ={lam:g}"
        if (run_dir / "record.json").exists():
            console.print(f"  {run.label}{lam_text}: finished in an earlier run, reusing {run_dir / 'record.json'}")
            return dict(json.loads((run_dir / "record.json").read_text()))
        L.seed_everything(seed, verbose=False)
        policy = copy.deepcopy(base) if self.lora is None else self.lora.wrap(copy.deepcopy(base))
        reference = None if run.method.reference_free else REFERENCES[self.reference](base, policy)
        module = run.method(CausalLMScorer(policy), reference, [params], run.train.optimizer)
        history = LossHistory()
        checkpoints = ModelCheckpoint(
            dirpath=run_dir, filename="last", enable_version_counter=False, every_n_train_steps=run.train.checkpoint_every_n_steps
        )
        trainer = build_trainer(run.train, [history, checkpoints, RichProgressBar(leave=False)], enable_checkpointing=True)
        before = trainer.validate(module, datamodule=data, verbose=False)[0]
        resume = run_dir / "last.ckpt"
        if resume.exists():
            console.print(f"  {run.label}{lam_text}: resuming from {resume}")
        started = time.perf_counter()
        trainer.fit(module, datamodule=data, ckpt_path=resume if resume.exists() else None)
        seconds = time.perf_counter() - started
        after = trainer.validate(module, datamodule=data, verbose=False)[0]
        accuracy = "rewards_accuracy" if "val/rewards_accuracy" in after else "preference_accuracy"
        console.print(
            f"  {run.label}{lam_text}: {trainer.global_step} steps in {seconds:.1f} s; held-out loss "
            f"{before['val/loss']:.4f} -> {after['val/loss']:.4f}, {accuracy} {after[f'val/{accuracy}']:.3f}"
        )
        record = {
            "method": run.label,
            "lam": lam,
            **identity,
            "steps": trainer.global_step,
            "train_seconds": round(seconds, 3),
            "eval_before": before,
            "eval_after": after,
            "loss_history": history.losses,
            "checkpoint": str(resume),
        }
        partial = run_dir / "record.json.partial"
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(run_dir / "record.json")  # written last: its presence means the run finished
        return record

    def report(self, experiment: Experiment, records: list[dict[str, Any]], out_dir: Path, console: Console) -> list[Path]:
        rows = report.metric_rows(records)
        console.print(report.rich_table(f"{experiment.recipe.experiment}: held-out pairs after training", rows))
        table = out_dir / "methods.md"
        table.write_text(f"# {experiment.recipe.experiment}: held-out pairs after training\n\n" + report.markdown_table(rows))
        curves = out_dir / "training.png"
        report.plot_training(records, curves)
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
        sft = self._sft(base, train, evaluation, pad, seed, console) if self.sft else {}
        return Prepared(train, evaluation, sft)


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
