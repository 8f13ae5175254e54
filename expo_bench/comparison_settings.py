"""How a recipe asks the leaderboard to compare methods (``statistics:``), apart from the statistics themselves
(:mod:`expo_bench.comparison`) so that validating a recipe imports no scipy."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from expo_bench.config_model import ConfigModel


class StatisticsConfig(ConfigModel):
    """How the leaderboard compares methods (``statistics:`` in a recipe); it changes no run, only the tables."""

    equivalence_fraction: float = Field(0.5, gt=0)
    """The equivalence margin as a fraction of the best row's mean paired gap to the baseline method: 0.5 asks whether
    a method is within half of what the best one gains over the baseline (a margin the gain itself sets, in the rank
    metric's units)."""
    equivalence_margin: float | None = Field(None, gt=0)
    """An absolute margin in the rank metric's units instead (e.g. 0.25 nats of KL); it overrides the fraction."""
    leave_one_seed_out: bool = False
    """Also report the rank metric of a pick made without in-sample bias: each seed's value from the configuration that
    is best on the *other* seeds' selection metric (:func:`expo_bench.comparison.leave_one_out_pick`)."""

    added_later: ClassVar[frozenset[str]] = frozenset({"kl_budgets"})
    kl_budgets: list[float] = Field([], max_length=4)
    """Also rank at each of these KL(π‖π_ref) budgets (the reward–KL frontier read at fixed KL): a table per budget in
    which each method competes only with its configurations whose mean KL on the selection prompts is within it, the
    best of those by the selection metric."""

    @field_validator("kl_budgets")
    @classmethod
    def _positive(cls, budgets: list[float]) -> list[float]:
        if any(budget <= 0 for budget in budgets):
            raise ValueError(f"KL budgets must be positive, got {budgets}")
        return budgets

    def margin(self, best_gap: float | None) -> float | None:
        """The TOST margin, given the best row's mean paired difference from the baseline (None: no baseline)."""
        if self.equivalence_margin is not None:
            return self.equivalence_margin
        return None if best_gap is None or best_gap == 0 else self.equivalence_fraction * abs(best_gap)
