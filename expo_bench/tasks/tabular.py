"""The tabular task (the EXPO paper's synthetic tests): softmax policies over a few responses per prompt with a known
Bradley–Terry-optimal policy π*."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from expo_bench import metric_keys
from expo_bench.config_model import ConfigModel
from expo_bench.methods.base import KL_SAMPLES
from expo_bench.metric_keys import Metric
from expo_bench.tasks.base import TaskBase


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


class TabularTask(TaskBase):
    """Softmax policy over a few responses per prompt, trained on sampled pairs and on the population."""

    kind: Literal["tabular"]
    prompts: list[TabularPrompt] = Field(min_length=1)
    draws_per_prompt: int = Field(gt=0)
    population: PopulationObjective | None = PopulationObjective()
    """Also train each method on the exact population objective (every pair, labels p*); null to skip."""
    trajectory_points: int = Field(200, ge=2)
    """How many policy snapshots to keep per run for the trajectory plots."""
    order: Literal["fixed", "reshuffled"] = "fixed"
    """``fixed``: every epoch visits the sampled pairs in the one order they were drawn (and, with several prompts,
    shuffled once), as the authors' code does; ``reshuffled``: a fresh permutation each epoch, seeded."""
    kl_reduction: Literal["sum", "mean"] = "sum"
    """How tables and plots reduce KL(π*‖π) over responses: ``sum`` is the KL; ``mean`` divides it by the number of
    responses, which is what the authors plot (``F.kl_div(log π, π*, reduction="mean")``). The leaderboard's metric is
    always the KL itself."""
    rank_by: ClassVar[Metric] = metric_keys.KL_TO_TARGET
    """KL(π*‖π) summed over prompts ranks the replicas (lower is better)."""

    @model_validator(mode="after")
    def _same_response_count(self) -> TabularTask:
        if len({len(prompt.pi_star) for prompt in self.prompts}) > 1:
            raise ValueError("every prompt needs the same number of responses")
        return self

    @property
    def kl_label(self) -> str:
        """The name of the KL that tables and plots show."""
        return "KL(π* ‖ π)" if self.kl_reduction == "sum" else f"KL(π* ‖ π)/{len(self.prompts[0].pi_star)}"

    def shown_kl(self, kl: float) -> float:
        """KL(π*‖π) as tables and plots show it."""
        return kl if self.kl_reduction == "sum" else kl / len(self.prompts[0].pi_star)

    def provides(self) -> frozenset[str]:
        """Optional batch fields the data carries: every response of a prompt, weighted by π_ref."""
        return frozenset({KL_SAMPLES})
