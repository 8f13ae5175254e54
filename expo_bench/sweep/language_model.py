"""A language-model sweep, per seed: the task's SFT examples, SFT (the reference), the task's pairs, the reference
work every method shares (samples, log-probs; cached), then every (method, λ) trained, evaluated and recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from transformers import PreTrainedModel

from expo_bench import metric_keys
from expo_bench.cache import digest
from expo_bench.distributed import rank_zero_first
from expo_bench.errors import UserError
from expo_bench.evaluation.types import Judge
from expo_bench.lm.data import PairData, PairDataset, fingerprint_module, fingerprint_pairs
from expo_bench.lm.evaluator import Evaluator, HeldOutPrompts, strip_eos
from expo_bench.lm.model import count_parameters, on_accelerator
from expo_bench.lm.reference import ReferenceWork, Splits, reference_work
from expo_bench.lm.sft import fine_tune
from expo_bench.lm.tokenize import fingerprint_tokenizer, pad_token_id
from expo_bench.recipe import MethodRun
from expo_bench.reporting import SweepProgress
from expo_bench.sweep import lm_report
from expo_bench.sweep.context import SweepContext
from expo_bench.sweep.fit import FitUnit, evaluate, fit
from expo_bench.sweep.records import (
    LanguageModelRecord,
    RunDirectoryKey,
    SeedProvenance,
    open_run,
    tracked_run_spec,
)
from expo_bench.tasks.language_model import LanguageModelTask, TaskData
from expo_bench.tracking import TrackedRun

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REFERENCE_LABEL = "sft-reference"
"""How the SFT reference appears among the methods when it is evaluated."""


def seed_line(seed: int, provenance: SeedProvenance) -> str:
    """One readable line on a seed's data and reference (``summary.json`` keeps every field)."""
    facts = [f"{key} {value}" for key, value in provenance.facts.items() if not key.startswith("sft_")]  # SFT has its line
    return (
        f"seed {seed}: {provenance.train_pairs} training and {provenance.eval_pairs} held-out pairs "
        f"({provenance.truncated_prompts} prompts and {provenance.truncated_responses} responses truncated); "
        f"reference {provenance.parameters / 1e6:.2f}M parameters; fingerprints: data {provenance.data_fingerprint}, "
        f"reference {provenance.reference_fingerprint}" + "".join(f"; {fact}" for fact in facts)
    )


@dataclass(frozen=True)
class _Prepared:
    """What the runs of one seed of one task instance share."""

    seed: int
    task: LanguageModelTask
    base: PreTrainedModel
    provenance: SeedProvenance
    datasets: tuple[PairDataset, PairDataset]
    evaluator: Evaluator | None
    runs_dir: Path

    def unit(self, run: MethodRun, index: int) -> FitUnit:
        """Configuration ``index`` of ``run``'s grid as one run to train."""
        task = self.task
        return FitUnit(
            run,
            run.grid[index],
            None if run.lam is None else run.lam[index],
            self.seed,
            self.provenance.data_fingerprint,
            self.provenance.reference_fingerprint,
            task.lora,
            task.reference,
            None
            if task.reference_samples is None
            else task.reference_samples.model_dump() | {"redraw": task.redraw_reference_samples},
            self.runs_dir,
        )


class LanguageModelSweep:
    """Every (seed, method, λ) of a recipe whose task is a :class:`LanguageModelTask`."""

    def __init__(self, context: SweepContext, task: LanguageModelTask) -> None:
        self.context, self.task = context, task
        self.progress = SweepProgress(context.experiment.run_count, context.console)

    def run(self) -> list[LanguageModelRecord]:
        with rank_zero_first():
            tokenizer = self.task.load_tokenizer(self.context.cache_dir)
        return [
            record
            for instance, task in self.task.task_instances()
            for seed in self.context.experiment.recipe.seeds
            for record in self._seed(tokenizer, seed, task, instance)
        ]

    def report(self, records: list[LanguageModelRecord], out_dir: Path) -> list[Path]:
        return lm_report.write(self.context.experiment.recipe.experiment, records, out_dir, self.context.console)

    def _seed(
        self, tokenizer: PreTrainedTokenizerBase, seed: int, task: LanguageModelTask, instance: str | None
    ) -> list[LanguageModelRecord]:
        """One seed of one task instance (``instance`` None: the recipe's one instance): the work its runs share, prepared
        once (in stage ``work``, only when this process claims one of them), then each run this process takes."""
        share = self.context.share
        prepared: _Prepared | None = None
        records = []
        if share.stage != "work":
            prepared = self._prepare(tokenizer, seed, task, instance)
            if prepared.evaluator is not None:
                records.append(self._evaluate_reference(prepared.evaluator, seed, prepared.provenance, instance))
        for entry, run in enumerate(self.context.experiment.runs):
            for index in range(len(run.grid)):
                # a method's grid over training settings is several entries of one label: the entry's position tells them apart
                slot = "/".join(part for part in (instance, f"s{seed}", f"{entry}-{run.label}", str(index)) if part)
                if not share.takes(slot):
                    continue
                prepared = prepared or self._prepare(tokenizer, seed, task, instance)
                record = self._run(prepared, prepared.unit(run, index), instance)
                share.finished(slot)
                if record is not None:  # a diverged run is recorded as failed in the store, and left out here
                    records.append(record)
        return records

    def _prepare(self, tokenizer: PreTrainedTokenizerBase, seed: int, task: LanguageModelTask, instance: str | None) -> _Prepared:
        """What every run of a seed shares: the SFT reference, the pairs, the reference's samples and log-probs (each
        cached, computed by the first process that needs it while the others wait), and the evaluator."""
        console, cache_dir = self.context.console, self.context.cache_dir
        pad = pad_token_id(tokenizer)
        sft_seed = seed if task.sft_seed is None else task.sft_seed
        L.seed_everything(sft_seed, verbose=False)
        with rank_zero_first():  # one rank downloads the weights and the data, the others then read its copies
            base = task.model.build(vocab_size=len(tokenizer))
            examples = task.sft_examples(sft_seed, tokenizer, console)
        sft = {}
        if task.sft is not None:
            sft = fine_tune(base, examples.train, examples.held_out, pad, sft_seed, task.sft, cache_dir, console).provenance()
        if sft_seed != seed:
            L.seed_everything(seed, verbose=False)
        data = task.task_data(seed, tokenizer, base, examples, cache_dir, console)
        pairs = data.train + data.evaluation
        provenance = SeedProvenance(
            data_fingerprint=fingerprint_pairs(pairs),
            tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
            train_pairs=len(data.train),
            eval_pairs=len(data.evaluation),
            truncated_prompts=sum(pair.prompt_truncated for pair in pairs),
            truncated_responses=sum(pair.response_truncated for pair in pairs),
            reference_fingerprint=fingerprint_module(base),
            parameters=count_parameters(base),
            facts={**sft, **data.provenance, **({} if instance is None else {"instance": instance})},
        )
        console.print(seed_line(seed, provenance), highlight=False)
        splits = data.train, data.evaluation
        datasets = self._reference_work(base, splits, pad, tokenizer.eos_token_id, seed, provenance).datasets(splits, pad)
        evaluator = None if task.evaluation is None else self._evaluator(data, tokenizer, base, seed)
        prepared = _Prepared(seed, task, base, provenance, datasets, evaluator, self.context.runs_dir)
        if task.evaluation is not None and task.evaluation.evaluate_only:
            units = [prepared.unit(run, index) for run in self.context.experiment.runs for index in range(len(run.grid))]
            missing = [unit for unit in units if not unit.finished]
            if missing:
                raise UserError(
                    f"evaluate_only, but these runs have not finished training (seed {seed}): "
                    f"{', '.join(f'{unit.name} under {unit.run_dir}' for unit in missing)}; "
                    "train them first (task.evaluation.evaluate_only: false)"
                )
        return prepared

    def _run(self, prepared: _Prepared, unit: FitUnit, instance: str | None) -> LanguageModelRecord | None:
        """Train (or reuse, or resume) one run, evaluate and record it; None when it diverged."""
        evaluator, seed, evaluation = prepared.evaluator, prepared.seed, prepared.task.evaluation
        every = None if evaluation is None else evaluation.every_n_steps
        self.progress.start(f"{unit.name}, seed {seed}")
        regularization = unit.run.method.regularization
        tracked = self._open(unit.run.label, unit.lam, unit.directory_key, unit.run_dir, evaluator, instance, regularization)
        pair_data = PairData(*prepared.datasets, unit.run.train.batch_size, seed, unit.run.train.group_by_length)
        result = fit(unit, prepared.base, pair_data, evaluator, every, tracked, self.context.console)
        if result is None:
            return None
        samples = None if evaluator is None else evaluator.samples_path(unit.run_dir)
        return LanguageModelRecord(
            unit.run.label, unit.lam, unit.directory_key, prepared.provenance, *result, regularization, samples
        )

    def _reference_work(
        self, base: PreTrainedModel, splits: Splits, pad: int, eos: int, seed: int, provenance: SeedProvenance
    ) -> ReferenceWork:
        """The reference's samples and log-probs the recipe asks for, computed once for every method (cached)."""
        task = self.task
        key: dict[str, Any] = {"reference": provenance.reference_fingerprint, "data": provenance.data_fingerprint}
        sampling, per_epoch = task.reference_samples, None
        if sampling is not None and task.redraw_reference_samples:  # every epoch's samples drawn up front
            per_epoch = sampling.samples_per_prompt
            epochs = max(run.train.max_epochs for run in self.context.experiment.runs)
            sampling = sampling.model_copy(update={"samples_per_prompt": per_epoch * epochs})
        batch_size = self.context.experiment.runs[0].train.batch_size if task.reference == "cached" else None
        with on_accelerator(base):
            return reference_work(
                base, splits, pad, eos, sampling, per_epoch, batch_size, seed, key, self.context.cache_dir, self.context.console
            )

    def _evaluator(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, base: PreTrainedModel, seed: int) -> Evaluator:
        """The judge, and the task's test prompts or else its held-out prompts: the selection prompts first, then the
        reported ones (the first ``evaluation.prompts`` of the rest)."""
        config = self.task.evaluation
        assert config is not None
        judges: list[Judge] = [judge.build(self.context.cache_dir / "judgments", seed) for judge in config.panel]
        judges = judges or list(data.judges)
        assert judges, "the recipe validator requires a judge for tasks without their own"
        truth = data.judges[0] if config.calibrate else None
        found = data.test or self._held_out_prompts(data, tokenizer)
        set_aside = 0 if config.selection is None else config.selection.prompts
        reported = found.cut(set_aside, None if config.prompts is None else set_aside + config.prompts)
        if not reported:
            raise UserError(
                f"task.evaluation: the task has {len(found)} evaluation prompts and selection sets aside {set_aside}, "
                "leaving none to report on; lower task.evaluation.selection.prompts"
            )
        selection = found.cut(0, set_aside) if set_aside else None
        return Evaluator(config, tokenizer, base, reported, judges, seed, self.context.cache_dir, data.exact, selection, truth)

    @staticmethod
    def _held_out_prompts(data: TaskData, tokenizer: PreTrainedTokenizerBase) -> HeldOutPrompts:
        """Each distinct held-out prompt once, with its first chosen response."""
        pairs = list({tuple(pair.prompt_ids): pair for pair in reversed(data.evaluation)}.values())[::-1]
        eos = tokenizer.eos_token_id
        return HeldOutPrompts(
            [pair.prompt_ids for pair in pairs],
            [data.prompt_texts.get(tuple(pair.prompt_ids)) or str(tokenizer.decode(pair.prompt_ids)) for pair in pairs],
            [strip_eos(pair.chosen_ids, eos) for pair in pairs],
        )

    def _evaluate_reference(
        self, evaluator: Evaluator, seed: int, provenance: SeedProvenance, instance: str | None
    ) -> LanguageModelRecord:
        """The SFT reference evaluated like a method: the frontier's origin and the win rate of "no optimization"."""
        key = RunDirectoryKey("reference", seed, provenance.data_fingerprint, provenance.reference_fingerprint)
        run_dir = self.context.runs_dir / f"{REFERENCE_LABEL}-{digest(key.as_json())}"
        tracked = self._open(REFERENCE_LABEL, None, key, run_dir, evaluator, instance)
        metrics = evaluate(evaluator, REFERENCE_LABEL, evaluator.reference, run_dir, self.context.console)
        if not tracked.complete:
            tracked.log_metrics(metrics)
            tracked.log_artifacts([evaluator.results_dir(run_dir)])
            tracked.mark_complete()
        return LanguageModelRecord(REFERENCE_LABEL, None, key, provenance, None, metrics, samples=evaluator.samples_path(run_dir))

    def _open(
        self,
        label: str,
        lam: float | None,
        identity: RunDirectoryKey,
        run_dir: Path,
        evaluator: Evaluator | None,
        instance: str | None,
        regularization: str | None = None,
    ) -> TrackedRun:
        """The tracking-store run of one trained (or reference) policy under one evaluation."""
        evaluation = None if evaluator is None else evaluator.key()
        rank_by = self.task.rank_by if evaluator is not None else metric_keys.VAL_PREFERENCE_ACCURACY
        selection = None if evaluator is None else evaluator.config.selection
        return open_run(
            self.context.runs,
            tracked_run_spec(
                f"{run_dir.name}/{evaluation}",
                label,
                lam,
                identity.as_json(),
                identity.configuration(lam) | {"evaluation": evaluation},
                (self.task.dataset, self.task.model_name, rank_by),
                logged=None if evaluator is None else {"evaluation": evaluator.config.model_dump(mode="json")},
                selection_by=None
                if selection is None
                else metric_keys.stage_key(metric_keys.SELECTION, selection.metric or rank_by.name),
                judge=None if evaluator is None else evaluator.judge_names,
                regularization=regularization,
                instance=instance,
            ),
        )
