"""Tables and plots of a language-model sweep: held-out metrics per method, sampled evaluation, training curves."""

from __future__ import annotations

import json
import lzma
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from rich.console import Console

from expo_bench import metric_keys, reporting
from expo_bench.cache import atomic_write
from expo_bench.metric_keys import Metric
from expo_bench.sweep.records import LanguageModelRecord

HEADER = ["method", "λ", "seed", "steps", *(metric.title for metric in metric_keys.HELD_OUT_COLUMNS)]
FACETS_PER_ROW = 3


def _lam(record: LanguageModelRecord) -> str:
    """The run's λ, whichever hyperparameter plays it (DPO's β, EXPO's λ), as the leaderboard shows it."""
    if record.lam is not None:
        return f"{record.lam:g}"
    params, field = record.directory_key.params, record.regularization
    return "—" if params is None or field is None or field not in params else f"{params[field]:g}"


def _seed(record: LanguageModelRecord) -> str:
    """The run's seed, and its task instance where the recipe runs several (seed 0 of two instances are two runs)."""
    instance = record.provenance.facts.get("instance")
    return str(record.seed) if instance is None else f"{record.seed} (instance {instance})"


def metric_rows(records: Sequence[LanguageModelRecord]) -> list[list[str]]:
    """One row per trained run: held-out metrics after training, with the value before training in brackets."""
    rows = []
    for record in records:
        assert record.training is not None
        before, after = record.training.eval_before, record.training.eval_after

        def cell(key: str, before: dict[str, float] = before, after: dict[str, float] = after) -> str:
            return "—" if key not in after else f"{after[key]:.4f} ({before[key]:.4f})"

        rows.append(
            [
                record.method,
                _lam(record),
                _seed(record),
                str(record.training.steps),
                *(cell(metric.key) for metric in metric_keys.HELD_OUT_COLUMNS),
            ]
        )
    return rows


def _with_stderr(metrics: dict[str, float], metric: Metric) -> str:
    """A run's value, ± 1.96 standard errors over its prompts where the metric has one (the KL estimate's included)."""
    if metric.key not in metrics:
        return "—"
    stderr = metric_keys.STANDARD_ERRORS.get(metric.key)
    within = None if stderr is None else metrics.get(stderr.key)
    return reporting.with_interval(metrics[metric.key], None if within is None else reporting.Z_95 * within)


def evaluation_table(records: Sequence[LanguageModelRecord]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per evaluated run (the SFT reference included): the leaderboard's columns it logged, those
    undefined in the setting (self-BLEU of one sample per prompt) left out."""
    evaluated = [(record, record.evaluation) for record in records if record.evaluation is not None]
    columns = [
        metric
        for metric in metric_keys.LEADERBOARD_COLUMNS
        if any(math.isfinite(metrics.get(metric.key, math.nan)) for _, metrics in evaluated)
    ]
    rows = [
        [record.method, _lam(record), _seed(record), *(_with_stderr(metrics, metric) for metric in columns)]
        for record, metrics in evaluated
    ]
    return ["method", "λ", "seed", *(metric.title for metric in columns)], rows


def smoothed(values: Sequence[float]) -> np.ndarray:
    """A centred moving average over about a tenth of the curve (at the ends, over the points there are)."""
    window = max(1, len(values) // 8) | 1
    kernel = np.ones(window)
    padded = np.convolve(np.asarray(values, dtype=float), kernel, mode="same")
    counts = np.convolve(np.ones(len(values)), kernel, mode="same")
    return padded / counts


def held_out_accuracy(metrics: dict[str, float], keys: Sequence[str]) -> float:
    return next((metrics[key] for key in keys if key in metrics), math.nan)


def training_figure(records: Sequence[LanguageModelRecord]) -> Figure:
    """The training loss as logged, smoothed, one panel per method with its own scale (λ by colour, seeds as lines);
    the legend gives each λ's held-out reward accuracy after training, averaged over seeds. Never divided by the first
    loss: a first loss near zero or negative (EXPO's) would blow the curve up and flatten every other panel."""
    by_method: dict[str, list[LanguageModelRecord]] = defaultdict(list)
    for record in records:
        by_method[record.method].append(record)
    columns = min(FACETS_PER_ROW, max(1, len(by_method)))
    rows = math.ceil(len(by_method) / columns) or 1
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    accuracies = (metric_keys.VAL_REWARDS_ACCURACY.key, metric_keys.VAL_PREFERENCE_ACCURACY.key)  # the second without a reference
    for ax, (method, runs) in zip(axes.flat, by_method.items(), strict=False):
        lams = sorted({record.lam for record in runs}, key=lambda lam: -1.0 if lam is None else lam)
        colours = plt.colormaps["viridis"](np.linspace(0.0, 0.85, len(lams)))
        for lam, colour in zip(lams, colours, strict=True):
            at_lam = [record for record in runs if record.lam == lam]
            accuracy = [held_out_accuracy(r.training.eval_after, accuracies) for r in at_lam if r.training is not None]
            label = ("" if lam is None else f"λ={lam:g}, ") + f"held-out acc. {np.nanmean(accuracy):.2f}"
            for index, record in enumerate(at_lam):
                history = [] if record.training is None else record.training.loss_history
                if len(history) < 2:
                    continue
                steps, losses = zip(*history, strict=True)
                ax.plot(steps, smoothed(losses), color=colour, alpha=0.8, label=label if index == 0 else None)
        ax.set_title(method, fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", frameon=False)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (smoothed)")
    for ax in list(axes.flat)[len(by_method) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Training loss per method, each on its own scale; each line a seed. Held-out accuracy after training: h > 0\n"
        "(ties ½), or the policy's own preference for a reference-free method"
    )
    fig.tight_layout()
    return fig


def plot_training(records: Sequence[LanguageModelRecord], path: Path) -> None:
    fig = training_figure(records)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(experiment: str, records: Sequence[LanguageModelRecord], out_dir: Path, console: Console) -> list[Path]:
    """``methods.md`` (held-out pair metrics after training; sampled evaluation) and ``training.png``."""
    trained = [record for record in records if record.training is not None]
    rows = metric_rows(trained)
    title = f"{experiment}: held-out pairs after training (before)"
    console.print(reporting.rich_table(title, HEADER, rows, console.width, "methods.md"))
    note = "\nEach cell: after training (before training, i.e. the reference/SFT model).\n"
    text = f"# {experiment}: held-out pairs after training\n\n" + reporting.markdown_table(HEADER, rows) + note
    header, evaluated = evaluation_table(records)
    if evaluated:
        console.print(reporting.rich_table(f"{experiment}: sampled evaluation", header, evaluated, console.width, "methods.md"))
        note = "\n± : 1.96 standard errors over the run's prompts (samples), where the metric has one.\n"
        text += f"\n## Sampled evaluation\n\n{reporting.markdown_table(header, evaluated)}{note}"
    table = out_dir / "methods.md"
    table.write_text(text)
    curves = out_dir / "training.png"
    plot_training(trained, curves)
    samples = write_samples(records, out_dir / SAMPLES)
    return [table, curves, *([] if samples is None else [samples])]


SAMPLES = "samples.jsonl.xz"
"""Every evaluated policy's samples on the reported prompts, one JSON object a line: what anyone can judge again."""


def write_samples(records: Sequence[LanguageModelRecord], path: Path) -> Path | None:
    """Each evaluated run's samples on the reported prompts at the leaderboard temperature (prompt, completion, method,
    its hyperparameters, seed and the reward where the judge gives one), xz-compressed; None when none was evaluated."""
    rows = []
    for record in sorted(records, key=lambda r: (r.method, json.dumps(r.directory_key.params, sort_keys=True), r.seed)):
        if record.samples is None or not record.samples.exists():
            continue
        common = {"method": record.method, "lam": record.lam, "params": record.directory_key.params, "seed": record.seed}
        if (instance := record.provenance.facts.get("instance")) is not None:
            common["instance"] = instance
        for line in record.samples.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            kept = {"prompt_index": sample["prompt_index"], "prompt": sample["prompt"], "completion": sample["response"]}
            rows.append(json.dumps(common | kept | {k: sample[k] for k in ("reward",) if k in sample}, ensure_ascii=False))
    if not rows:
        return None
    atomic_write(path, lzma.compress(("\n".join(rows) + "\n").encode("utf-8"), preset=9))
    return path
