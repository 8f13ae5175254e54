"""A tabular sweep (the EXPO paper's synthetic tests): per seed, every method with all its λ as replicas of one
policy, on the sampled pairs and on the exact population objective; one record and one tracked run per replica.

Nothing here is worth caching: a tabular run costs less than a lookup.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from expo_bench import metric_keys
from expo_bench.cache import digest
from expo_bench.recipe import MethodRun
from expo_bench.reporting import SweepProgress, markdown_table, rich_table
from expo_bench.sweep import tabular_report as report
from expo_bench.sweep.context import SweepContext
from expo_bench.sweep.records import TabularRecord, open_run, tracked_run_spec
from expo_bench.tabular.data import TabularPreferenceData, population_pairs, sample_pairs
from expo_bench.tabular.policy import PolicyTrajectory, TabularPolicy, kl
from expo_bench.tasks.tabular import TabularTask
from expo_bench.train_config import TrainConfig
from expo_bench.trainer import build_trainer

MODEL = "tabular softmax"


class TabularSweep:
    """Every (seed, method, λ, objective) of a recipe whose task is a :class:`TabularTask`."""

    def __init__(self, context: SweepContext, task: TabularTask) -> None:
        self.context, self.task = context, task
        objectives = 1 if task.population is None else 2  # the sampled pairs, and the population objective
        runs = len(context.experiment.recipe.seeds) * len(context.experiment.runs) * objectives
        self.progress = SweepProgress(runs, context.console)
        self.pi_star = torch.tensor([prompt.pi_star for prompt in task.prompts], dtype=torch.float64)
        self.pi_ref = torch.tensor([prompt.pi_ref for prompt in task.prompts], dtype=torch.float32)

    def run(self) -> list[TabularRecord]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a few dozen parameters: threading only adds overhead
        records: list[TabularRecord] = []
        try:
            for seed in self.context.experiment.recipe.seeds:
                records += self._seed(seed)
        finally:
            torch.set_num_threads(threads)
        return records

    def _seed(self, seed: int) -> list[TabularRecord]:
        task, pi_star = self.task, self.pi_star.tolist()
        sampled = sample_pairs(pi_star, task.draws_per_prompt, seed)
        self.context.console.print(f"seed {seed}: {len(sampled)} sampled pairs over {len(task.prompts)} prompt(s)")
        records: list[TabularRecord] = []
        for run in self.context.experiment.runs:
            data = TabularPreferenceData(sampled, self.pi_ref, run.train.batch_size, seed, reshuffle=task.order == "reshuffled")
            self.progress.start(f"{run.label}, seed {seed}")
            records += self._tracked(self._fit(run, run.train, data, "sampled", seed))
            if task.population is not None:
                optimizer = run.train.optimizer.model_copy(update={"lr": task.population.lr})
                train = run.train.model_copy(update={"max_epochs": 1, "optimizer": optimizer})
                data = TabularPreferenceData(
                    population_pairs(pi_star), self.pi_ref, 0, seed, full_batch_steps=task.population.steps
                )
                self.progress.start(f"{run.label} on the population objective, seed {seed}")
                records += self._tracked(self._fit(run, train, data, "population", seed))
        return records

    def report(self, records: list[TabularRecord], out_dir: Path) -> list[Path]:
        """Write the final-policy table (Markdown), the trajectories and the λ-sweep (PNG)."""
        experiment, console = self.context.experiment, self.context.console
        name = experiment.recipe.experiment
        header, rows = report.header(self.task), report.final_policy_rows(records, self.task)
        console.print(rich_table(f"{name}: final policies", header, rows, console.width, "final_policies.md"))
        table = out_dir / "final_policies.md"
        table.write_text(f"# {name}: final policies\n\n" + markdown_table(header, rows))
        trajectories, sweep = out_dir / "trajectories.png", out_dir / "lambda_sweep.png"
        report.plot_trajectories(records, self.task.prompts, trajectories)
        lam_labels = experiment.recipe.lam or next((run.lam for run in experiment.runs if run.lam), [0.0])
        if len(lam_labels) < 2:  # a sweep of one λ is no sweep
            return [table, trajectories]
        report.plot_lambda_sweep(records, self.task, lam_labels, sweep)
        return [table, trajectories, sweep]

    def _tracked(self, records: list[TabularRecord]) -> list[TabularRecord]:
        """Record each replica as its own run, ranked by KL(π*‖π) summed over prompts."""
        best = {prompt.name: max(range(len(prompt.pi_star)), key=prompt.pi_star.__getitem__) for prompt in self.task.prompts}
        regularization = {run.label: run.method.regularization for run in self.context.experiment.runs}
        for record in records:
            identity = {
                "method_class": record.method_class,
                "params": record.params,
                "train": record.train,
                "objective": record.objective,
                "seed": record.seed,
            }
            tracked = open_run(
                self.context.runs,
                tracked_run_spec(
                    digest(identity | {"task": self.task.model_dump(mode="json")}),
                    record.method,
                    record.lam,
                    identity,
                    {key: value for key, value in identity.items() if key != "seed"},
                    (f"{self.context.experiment.recipe.experiment}/{record.objective}", MODEL, self.task.rank_by),
                    detail=record.objective,
                    regularization=regularization[record.method],
                ),
            )
            if not tracked.complete:
                final = record.final_policy
                tracked.log_metrics(
                    {
                        metric_keys.KL_TO_TARGET.key: sum(record.kl_star_to_policy.values()),
                        metric_keys.TOP_RESPONSE_MASS.key: sum(final[name][best[name]] for name in final) / len(final),
                    }
                )
                tracked.mark_complete()
        return records

    def _fit(
        self, run: MethodRun, train: TrainConfig, data: TabularPreferenceData, objective: str, seed: int
    ) -> list[TabularRecord]:
        L.seed_everything(seed, verbose=False)
        policy = TabularPolicy(data.pi_ref, replicas=len(run.grid))
        module = run.method(policy=policy, reference=TabularPolicy(data.pi_ref), params=run.grid, optimizer=train.optimizer)
        steps = train.max_epochs * len(data.train_dataloader())
        trajectory = PolicyTrajectory(every=max(1, steps // self.task.trajectory_points))
        trainer = build_trainer(
            train, [trajectory, RichProgressBar(refresh_rate=50, leave=False)], accelerator="cpu", devices=1, log_every_n_steps=50
        )
        lams = "" if run.lam is None else f" {len(run.lam)} λ from {min(run.lam):g} to {max(run.lam):g}"
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - started
        self.context.console.print(f"  {run.label:<20} {objective:<10}{lams}: {trainer.global_step} steps in {seconds:.1f} s")
        final = torch.softmax(policy.logits.detach().double(), dim=-1)
        history = torch.stack(trajectory.probabilities)
        prompts = self.task.prompts
        return [
            TabularRecord(
                method=run.label,
                method_class=f"{run.method.__module__}:{run.method.__qualname__}",
                objective=objective,
                seed=seed,
                lam=None if run.lam is None else run.lam[g],
                params=params.model_dump(mode="json"),
                train=train.model_dump(mode="json"),
                steps=trainer.global_step,
                train_seconds=round(seconds, 3),
                final_policy={p.name: final[g, i].tolist() for i, p in enumerate(prompts)},
                kl_star_to_policy={p.name: kl(self.pi_star[i], final[g, i]) for i, p in enumerate(prompts)},
                kl_star_to_reference={p.name: kl(self.pi_star[i], data.pi_ref[i].double()) for i, p in enumerate(prompts)},
                trajectory_steps=trajectory.steps,
                trajectory=history[:, g].tolist(),
            )
            for g, params in enumerate(run.grid)
        ]
