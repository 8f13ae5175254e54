"""Tables and plots of a tabular sweep: final policies, trajectories, λ-sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from expo_bench.reporting import method_style
from expo_bench.sweep.records import TabularRecord
from expo_bench.tasks.tabular import TabularPrompt, TabularTask

OBJECTIVE_STYLE = {"sampled": "-", "population": "--"}


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def header(task: TabularTask) -> list[str]:
    return ["method", "λ", "objective", "seed", "prompt", "final π", task.kl_label]


def final_policy_rows(records: Sequence[TabularRecord], task: TabularTask) -> list[list[str]]:
    prompts = [prompt.name for prompt in task.prompts]
    rows = []
    for record in records:
        lam = "—" if record.lam is None else f"{record.lam:g}"
        for prompt in prompts:
            rows.append(
                [
                    record.method,
                    lam,
                    record.objective,
                    str(record.seed),
                    prompt,
                    _fmt(record.final_policy[prompt]),
                    f"{task.shown_kl(record.kl_star_to_policy[prompt]):.4f}",
                ]
            )
    return rows


def _methods_in_order(records: Sequence[TabularRecord]) -> list[str]:
    return list(dict.fromkeys(r.method for r in records))


def plot_trajectories(records: Sequence[TabularRecord], prompts: Sequence[TabularPrompt], path: Path, max_lams: int = 3) -> None:
    """π(y|x) during training: one panel per (prompt, λ position, method); sampled solid, population dashed.

    The x-axis is the fraction of each run's optimizer steps, since the two objectives have different budgets.
    """
    methods = _methods_in_order(records)
    grid_size = max(
        len([r for r in records if r.method == m and r.objective == "sampled" and r.seed == records[0].seed]) for m in methods
    )
    positions = sorted({0, grid_size // 2, grid_size - 1}) if grid_size > max_lams else list(range(grid_size))
    rows = [(prompt_index, position) for prompt_index in range(len(prompts)) for position in positions]
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(3.2 * len(methods), 2.4 * len(rows)), squeeze=False, sharey=True)
    seed = records[0].seed
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, method in enumerate(methods):
        for row, (prompt_index, position) in enumerate(rows):
            ax = axes[row][column]
            prompt = prompts[prompt_index]
            for objective, style in OBJECTIVE_STYLE.items():
                runs = [r for r in records if r.method == method and r.objective == objective and r.seed == seed]
                if position >= len(runs):
                    continue
                run = runs[position]
                progress = [step / max(run.steps, 1) for step in run.trajectory_steps]
                for response in range(len(prompt.pi_star)):
                    values = [snapshot[prompt_index][response] for snapshot in run.trajectory]
                    ax.plot(
                        progress,
                        values,
                        style,
                        color=colors[response],
                        linewidth=1.2,
                        label=f"π(y{response + 1})" if objective == "sampled" else None,
                    )
                lam = "" if run.lam is None else f" λ={run.lam:g}"
                where = f"\nprompt {prompt.name!r}" if len(prompts) > 1 else ""  # one prompt needs no name
                ax.set_title(f"{method}{lam}{where}", fontsize=8)
            for response, target in enumerate(prompt.pi_star):
                ax.axhline(target, color=colors[response], linestyle=":", linewidth=0.8)
            ax.set_ylim(-0.02, 1.02)
            ax.tick_params(labelsize=7)
            if row == len(rows) - 1:
                ax.set_xlabel("fraction of training", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Policy trajectories (solid: sampled pairs, dashed: population objective, dotted: π*)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lambda_sweep(records: Sequence[TabularRecord], task: TabularTask, lam_labels: Sequence[float], path: Path) -> None:
    """KL(π* ‖ π_final) against the position in the λ grid, one panel per prompt.

    Colour is the method, line style the objective (solid: sampled pairs, dashed: population).
    """
    methods, prompts = _methods_in_order(records), task.prompts
    fig, axes = plt.subplots(1, len(prompts), figsize=(5 * len(prompts) + 2.5, 4), squeeze=False)
    seed = records[0].seed
    for index, prompt in enumerate(prompts):
        ax = axes[0][index]
        for method in methods:
            color = method_style(method)["color"]  # each method's colour in every plot of every experiment
            for objective, style in OBJECTIVE_STYLE.items():
                runs = [r for r in records if r.method == method and r.objective == objective and r.seed == seed]
                if runs:
                    ax.plot(
                        range(len(runs)),
                        [task.shown_kl(r.kl_star_to_policy[prompt.name]) for r in runs],
                        style,
                        marker="o",
                        markersize=3,
                        color=color,
                        label=method if objective == "sampled" else None,
                    )
        reference = task.shown_kl(records[0].kl_star_to_reference[prompt.name])
        ax.axhline(reference, color="grey", linestyle=":", label=task.kl_label.replace("‖ π", "‖ π_ref", 1))
        ax.set_xticks(range(len(lam_labels)), [f"{lam:.3g}" for lam in lam_labels], fontsize=7, rotation=45)
        ax.set_xlabel("λ (position in the recipe's grid)")
        ax.set_ylabel(task.kl_label)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
        ax.set_title(f"prompt {prompt.name!r} (solid: sampled, dashed: population)", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
