"""The tabular task: recipe section and its run (the EXPO paper's synthetic tests)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from pydantic import Field, model_validator
from rich.console import Console

from expo_bench import metric_keys
from expo_bench.cache import digest
from expo_bench.config_model import ConfigModel
from expo_bench.reporting import markdown_table, rich_table
from expo_bench.tabular import report
from expo_bench.tabular.data import TabularPreferenceData, population_pairs, sample_pairs
from expo_bench.tabular.policy import TabularPolicy
from expo_bench.training import TrainConfig, build_trainer

if TYPE_CHECKING:
    from expo_bench.recipe import Experiment, MethodRun
    from expo_bench.tracking import RunLog


class TabularPrompt(ConfigModel):
    """A prompt with the ground-truth policy π* (Bradley–Terry) and the reference π_ref."""

    name: str
    pi_star: list[float] = Field(min_length=2)
    pi_ref: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _distributions(self) -> TabularPrompt:
        for field in ("pi_star", "pi_ref"):
            values = getattr(self, field)
            if min(values) <= 0 or abs(sum(values) - 1) > 1e-6:
                raise ValueError(f"{field} must be positive probabilities summing to 1, got {values}")
        if len(self.pi_star) != len(self.pi_ref):
            raise ValueError("pi_star and pi_ref must have the same number of responses")
        return self


class PopulationObjective(ConfigModel):
    """Full-batch training on the exact population objective, run to (near) convergence.

    The sampled runs follow the paper's budget; these give each method's noise-free λ-curve.
    """

    steps: int = Field(3000, ge=1)
    lr: float = Field(0.01, gt=0)


class TabularTask(ConfigModel):
    """Softmax policy over a few responses per prompt, trained on sampled pairs and on the population."""

    kind: Literal["tabular"]
    prompts: list[TabularPrompt] = Field(min_length=1)
    draws_per_prompt: int = Field(gt=0)
    population: PopulationObjective | None = PopulationObjective()
    """Also train each method on the exact population objective (every pair, labels p*); null to skip."""
    trajectory_points: int = Field(200, ge=2)
    """How many policy snapshots to keep per run for the trajectory plots."""

    @model_validator(mode="after")
    def _same_response_count(self) -> TabularTask:
        if len({len(prompt.pi_star) for prompt in self.prompts}) > 1:
            raise ValueError("every prompt needs the same number of responses")
        return self

    def provides(self) -> frozenset[str]:
        """Optional batch fields the data carries: every response of a prompt, weighted by π_ref."""
        return frozenset({"kl_samples"})

    def run(self, experiment: Experiment, console: Console, cache_dir: Path, runs: RunLog) -> list[dict[str, Any]]:
        """Train every method (all λ as replicas) per seed and objective; return one record per replica.

        Nothing here is worth caching (``cache_dir`` is unused): a tabular run costs less than a lookup.
        """
        pi_star = torch.tensor([prompt.pi_star for prompt in self.prompts], dtype=torch.float64)
        pi_ref = torch.tensor([prompt.pi_ref for prompt in self.prompts], dtype=torch.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a few dozen parameters: threading only adds overhead
        records: list[dict[str, Any]] = []
        try:
            for seed in experiment.recipe.seeds:
                sampled = sample_pairs(pi_star.tolist(), self.draws_per_prompt, seed)
                console.print(f"seed {seed}: {len(sampled)} sampled pairs over {len(self.prompts)} prompt(s)")
                for run in experiment.runs:
                    data = TabularPreferenceData(sampled, pi_ref, run.train.batch_size, seed)
                    records += self._tracked(self._fit(run, run.train, data, "sampled", pi_star, seed, console), experiment, runs)
                    if self.population is not None:
                        train = run.train.model_copy(
                            update={
                                "max_epochs": 1,
                                "optimizer": run.train.optimizer.model_copy(update={"lr": self.population.lr}),
                            }
                        )
                        data = TabularPreferenceData(
                            population_pairs(pi_star.tolist()), pi_ref, 0, seed, full_batch_steps=self.population.steps
                        )
                        fitted = self._fit(run, train, data, "population", pi_star, seed, console)
                        records += self._tracked(fitted, experiment, runs)
        finally:
            torch.set_num_threads(threads)
        return records

    def report(self, experiment: Experiment, records: list[dict[str, Any]], out_dir: Path, console: Console) -> list[Path]:
        """Write the final-policy table (Markdown), the trajectories and the λ-sweep (PNG)."""
        rows = report.final_policy_rows(records, [prompt.name for prompt in self.prompts])
        console.print(rich_table(f"{experiment.recipe.experiment}: final policies", report.HEADER, rows))
        table = out_dir / "final_policies.md"
        table.write_text(f"# {experiment.recipe.experiment}: final policies\n\n" + markdown_table(report.HEADER, rows))
        trajectories, sweep = out_dir / "trajectories.png", out_dir / "lambda_sweep.png"
        report.plot_trajectories(records, self.prompts, trajectories)
        lam_labels = experiment.recipe.lam or next((run.lam for run in experiment.runs if run.lam), [0.0])
        report.plot_lambda_sweep(records, self.prompts, lam_labels, sweep)
        return [table, trajectories, sweep]

    def _tracked(self, records: list[dict[str, Any]], experiment: Experiment, runs: RunLog) -> list[dict[str, Any]]:
        """Record each replica as its own run: KL(π*‖π) summed over prompts ranks them (lower is better)."""
        from expo_bench import tracking  # MLflow loads only when runs are recorded: validate stays fast

        pi_star = {prompt.name: prompt.pi_star for prompt in self.prompts}
        for record in records:
            identity = {key: record[key] for key in ("method_class", "params", "train", "objective", "seed")}
            configuration = {key: value for key, value in identity.items() if key != "seed"}
            lam = "" if record["lam"] is None else f" λ={record['lam']:g}"
            tracked = runs.child(
                digest(identity | {"task": self.model_dump(mode="json")}),
                f"{record['method']}{lam} {record['objective']} s{record['seed']}",
                {"method": record["method"], "lam": record["lam"], **identity},
                {
                    tracking.METHOD: record["method"],
                    tracking.METHOD_CLASS: record["method_class"],
                    tracking.DATASET: f"{experiment.recipe.experiment}/{record['objective']}",
                    tracking.MODEL: "tabular softmax",
                    tracking.SEED: str(record["seed"]),
                    tracking.CONFIG_KEY: digest(configuration),
                    tracking.RANK_METRIC: metric_keys.KL_TO_TARGET,
                    tracking.RANK_GOAL: "min",
                },
            )
            if not tracked.complete:
                final = record["final_policy"]
                best = {name: max(range(len(p)), key=p.__getitem__) for name, p in pi_star.items()}
                tracked.log_metrics(
                    {
                        metric_keys.KL_TO_TARGET: sum(record["kl_star_to_policy"].values()),
                        metric_keys.TOP_RESPONSE_MASS: sum(final[name][best[name]] for name in final) / len(final),
                    }
                )
                tracked.mark_complete()
        return records

    def _fit(
        self,
        run: MethodRun,
        train: TrainConfig,
        data: TabularPreferenceData,
        objective: str,
        pi_star: torch.Tensor,
        seed: int,
        console: Console,
    ) -> list[dict[str, Any]]:
        L.seed_everything(seed, verbose=False)
        policy = TabularPolicy(data.pi_ref, replicas=len(run.grid))
        module = run.method(
            policy=policy,
            reference=TabularPolicy(data.pi_ref),
            params=run.grid,
            optimizer=train.optimizer,
        )
        steps = train.max_epochs * len(data.train_dataloader())
        trajectory = PolicyTrajectory(every=max(1, steps // self.trajectory_points))
        trainer = build_trainer(
            train, [trajectory, RichProgressBar(refresh_rate=50, leave=False)], accelerator="cpu", devices=1, log_every_n_steps=50
        )
        lams = "" if run.lam is None else f" {len(run.lam)} λ from {min(run.lam):g} to {max(run.lam):g}"
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - started
        console.print(f"  {run.label:<20} {objective:<10}{lams}: {trainer.global_step} steps in {seconds:.1f} s")
        final = torch.softmax(policy.logits.detach().double(), dim=-1)
        history = torch.stack(trajectory.probabilities)
        return [
            {
                "method": run.label,
                "method_class": f"{run.method.__module__}:{run.method.__qualname__}",
                "objective": objective,
                "seed": seed,
                "lam": None if run.lam is None else run.lam[g],
                "params": params.model_dump(mode="json"),
                "train": train.model_dump(mode="json"),
                "steps": trainer.global_step,
                "train_seconds": round(seconds, 3),
                "final_policy": {p.name: final[g, i].tolist() for i, p in enumerate(self.prompts)},
                "kl_star_to_policy": {p.name: kl(pi_star[i], final[g, i]) for i, p in enumerate(self.prompts)},
                "kl_star_to_reference": {p.name: kl(pi_star[i], data.pi_ref[i].double()) for i, p in enumerate(self.prompts)},
                "trajectory_steps": trajectory.steps,
                "trajectory": history[:, g].tolist(),
            }
            for g, params in enumerate(run.grid)
        ]


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p ‖ q) of two categorical distributions."""
    return float((p * (p.log() - q.log())).sum())


class PolicyTrajectory(Callback):
    """π(·|x) of every replica at the start and every ``every`` optimizer steps: ``(T, G, P, R)``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[int] = []
        self.probabilities: list[torch.Tensor] = []

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps.append(trainer.global_step)
        self.probabilities.append(cast(TabularPolicy, pl_module.policy).probabilities())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)
