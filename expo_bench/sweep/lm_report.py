"""Tables and plots of a language-model sweep: held-out metrics per method, sampled evaluation, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console

from expo_bench import metric_keys, reporting
from expo_bench.sweep.records import LanguageModelRecord, display_name

HEADER = ["method", "λ", "seed", "steps", *(metric.title for metric in metric_keys.HELD_OUT_COLUMNS)]


def _lam(record: LanguageModelRecord) -> str:
    return "—" if record.lam is None else f"{record.lam:g}"


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
                str(record.seed),
                str(record.training.steps),
                *(cell(metric.key) for metric in metric_keys.HELD_OUT_COLUMNS),
            ]
        )
    return rows


def evaluation_table(records: Sequence[LanguageModelRecord]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per evaluated run (the SFT reference included): the leaderboard's columns it logged."""
    evaluated = [(record, record.evaluation) for record in records if record.evaluation is not None]
    columns = [metric for metric in metric_keys.LEADERBOARD_COLUMNS if any(metric.key in metrics for _, metrics in evaluated)]
    rows = [
        [
            record.method,
            _lam(record),
            str(record.seed),
            *(f"{metrics[metric.key]:.4f}" if metric.key in metrics else "—" for metric in columns),
        ]
        for record, metrics in evaluated
    ]
    return ["method", "λ", "seed", *(metric.title for metric in columns)], rows


def plot_training(records: Sequence[LanguageModelRecord], path: Path) -> None:
    """Training loss relative to its first logged value, and held-out reward accuracy, per run."""
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4))
    labels = []
    for record in records:
        assert record.training is not None
        label = f"{display_name(record.method, record.lam)} s{record.seed}"
        labels.append(label)
        if record.training.loss_history:
            steps, losses = zip(*record.training.loss_history, strict=True)
            curves.plot(steps, [loss / losses[0] for loss in losses], label=label)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training loss / first logged loss")
    if curves.get_legend_handles_labels()[0]:  # runs shorter than the logging interval have no curve
        curves.legend(fontsize=7)
    key = metric_keys.VAL_REWARDS_ACCURACY.key
    accuracy = [record.training.eval_after.get(key, float("nan")) for record in records if record.training is not None]
    bars.barh(range(len(records)), accuracy)
    bars.set_yticks(range(len(records)), labels, fontsize=7)
    bars.axvline(0.5, color="grey", linestyle=":")
    bars.set_xlabel("held-out reward accuracy (h > 0; ties ½)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(experiment: str, records: Sequence[LanguageModelRecord], out_dir: Path, console: Console) -> list[Path]:
    """``methods.md`` (held-out pair metrics after training; sampled evaluation) and ``training.png``."""
    trained = [record for record in records if record.training is not None]
    rows = metric_rows(trained)
    console.print(reporting.rich_table(f"{experiment}: held-out pairs after training", HEADER, rows))
    note = "\nEach cell: after training (before training, i.e. the reference/SFT model).\n"
    text = f"# {experiment}: held-out pairs after training\n\n" + reporting.markdown_table(HEADER, rows) + note
    header, evaluated = evaluation_table(records)
    if evaluated:
        console.print(reporting.rich_table(f"{experiment}: sampled evaluation", header, evaluated))
        text += f"\n## Sampled evaluation\n\n{reporting.markdown_table(header, evaluated)}"
    table = out_dir / "methods.md"
    table.write_text(text)
    curves = out_dir / "training.png"
    plot_training(trained, curves)
    return [table, curves]
