"""What every judge shares: a comparison to judge, its verdict, and the judge protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from expo_bench.reporting import Done


@dataclass(frozen=True)
class Comparison:
    """A method's sample (the candidate) against a baseline response to the same prompt."""

    prompt: str
    candidate: str
    baseline: str


@dataclass(frozen=True)
class Verdict:
    outcome: float
    """1 the candidate wins, 0 it loses, 0.5 a tie, NaN when the judge's answer could not be parsed."""
    detail: dict[str, Any]
    """JSON-serializable and judge-specific: rewards, or the LLM's raw answer and the candidate's position."""
    candidate_reward: float | None = None
    """The candidate's scalar reward, from judges that have one (:attr:`Judge.gives_rewards`)."""
    orders: tuple[float, float] | None = None
    """For a comparison judged in both orders: the candidate's outcome when shown first and when shown second (NaN
    where that answer could not be parsed); None when it was judged in one order only."""


class Judge(Protocol):
    """Compares candidates with baselines; ``name`` goes into results' provenance."""

    name: str
    gives_rewards: bool
    """Whether every verdict carries the candidate's reward (so reward and reward–KL metrics exist)."""

    def judge(self, comparisons: Sequence[Comparison], done: Done | None = None) -> list[Verdict]:
        """A verdict per comparison; ``done`` is told how many comparisons are settled as the verdicts arrive."""
        ...
