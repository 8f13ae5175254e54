"""Tables and plots of a language-model run: held-out metrics per method, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

from expo_bench import metric_keys, reporting

COLUMNS = {
    "val/loss": "loss",
    "val/rewards_accuracy": "reward acc.",
    "val/rewards_margin": "log-ratio margin",
    "val/preference_accuracy": "policy pref. acc.",
    "val/logps_chosen": "log π(y_w)",
}
HEADER = ["method", "λ", "seed", "steps", *COLUMNS.values()]


def metric_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per run: held-out metrics after training, with the value before training in brackets."""

    def cell(record: dict[str, Any], key: str) -> str:
        after, before = record["eval_after"].get(key), record["eval_before"].get(key)
        return "—" if after is None else f"{after:.4f} ({before:.4f})"

    return [
        [
            record["method"],
            "—" if record["lam"] is None else f"{record['lam']:g}",
            str(record["seed"]),
            str(record["steps"]),
            *(cell(record, key) for key in COLUMNS),
        ]
        for record in records
    ]


def evaluation_table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per evaluated run (the SFT reference included): the leaderboard's columns it logged."""
    evaluated = [record for record in records if "eval" in record]
    columns = [column for column in metric_keys.LEADERBOARD_COLUMNS if any(column.key in r["eval"] for r in evaluated)]
    rows = [
        [
            record["method"],
            "—" if record["lam"] is None else f"{record['lam']:g}",
            str(record["seed"]),
            *(f"{record['eval'][column.key]:.4f}" if column.key in record["eval"] else "—" for column in columns),
        ]
        for record in evaluated
    ]
    return ["method", "λ", "seed", *(column.title for column in columns)], rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    note = "\nEach cell: after training (before training, i.e. the reference/SFT model).\n"
    return reporting.markdown_table(HEADER, rows) + note


def rich_table(title: str, rows: Sequence[Sequence[str]]) -> Table:
    return reporting.rich_table(title, HEADER, rows)


def plot_training(records: Sequence[dict[str, Any]], path: Any) -> None:
    """Training loss relative to its first logged value, and held-out reward accuracy, per run."""
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4))
    labels = []
    for record in records:
        label = record["method"] + ("" if record["lam"] is None else f" λ={record['lam']:g}") + f" s{record['seed']}"
        labels.append(label)
        if record["loss_history"]:
            steps, losses = zip(*record["loss_history"], strict=True)
            curves.plot(steps, [loss / losses[0] for loss in losses], label=label)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training loss / first logged loss")
    if curves.get_legend_handles_labels()[0]:  # runs shorter than the logging interval have no curve
        curves.legend(fontsize=7)
    accuracy = [record["eval_after"].get("val/rewards_accuracy", float("nan")) for record in records]
    bars.barh(range(len(records)), accuracy)
    bars.set_yticks(range(len(records)), labels, fontsize=7)
    bars.axvline(0.5, color="grey", linestyle=":")
    bars.set_xlabel("held-out reward accuracy (h > 0; ties ½)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
