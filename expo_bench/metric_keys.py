"""Every metric key a run logs to the tracking store, and the leaderboard's columns: named once, here.

Evaluation metrics are logged twice: per sampling temperature (``eval/T0.5/win_rate``, for the win rate vs
temperature plot) and, unprefixed (``eval/win_rate``), at the recipe's leaderboard temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EVAL = "eval"

# Training (logged by the method modules through Lightning; ``val/`` on held-out pairs).
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_REWARDS_ACCURACY = "val/rewards_accuracy"
VAL_PREFERENCE_ACCURACY = "val/preference_accuracy"

# Evaluation of sampled responses (names as the evaluation metrics' ``compute()`` returns them).
WIN_RATE = "eval/win_rate"
WIN_RATE_STDERR = "eval/stderr"
WIN_RATE_CI_LOW = "eval/ci_low"
WIN_RATE_CI_HIGH = "eval/ci_high"
LC_WIN_RATE = "eval/lc_win_rate"
JUDGED = "eval/n"
INVALID_VERDICTS = "eval/invalid"
REWARD = "eval/reward"
KL = "eval/kl"
DISTINCT_2 = "eval/distinct_2_within_prompt"
SELF_BLEU = "eval/self_bleu_within_prompt"
ENTROPY_2 = "eval/entropy_2_across_prompts"
MEAN_LENGTH = "eval/mean_length"

# Tasks with an exactly known target policy.
KL_TO_TARGET = "eval/kl_target_to_policy"
"""KL(π_target ‖ π) summed over prompts: the synthetic tasks' distance to the optimal policy."""
TOP_RESPONSE_MASS = "eval/top_response_mass"
"""Mean probability of each prompt's highest-reward response: how far a policy collapsed onto it."""


def at_temperature(key: str, temperature: float) -> str:
    """``eval/win_rate`` at temperature 0.5 is ``eval/T0.5/win_rate``."""
    prefix, name = key.split("/", 1)
    return f"{prefix}/T{temperature:g}/{name}"


@dataclass(frozen=True)
class Column:
    """A leaderboard column: a metric key, its heading, and whether higher or lower is better."""

    key: str
    title: str
    goal: Literal["max", "min"]
    spread: bool = True
    """Show mean ± CI over seeds (False: just the mean, e.g. counts)."""


LEADERBOARD_COLUMNS: tuple[Column, ...] = (
    Column(WIN_RATE, "win rate", "max"),
    Column(LC_WIN_RATE, "LC win rate", "max"),
    Column(REWARD, "reward", "max"),
    Column(KL, "KL(π‖π_ref)", "min"),
    Column(KL_TO_TARGET, "KL(π*‖π)", "min"),
    Column(TOP_RESPONSE_MASS, "top-response mass", "max"),
    Column(DISTINCT_2, "distinct-2", "max"),
    Column(SELF_BLEU, "self-BLEU", "min"),
    Column(ENTROPY_2, "2-gram entropy", "max"),
    Column(MEAN_LENGTH, "length", "max", spread=False),
    Column(VAL_PREFERENCE_ACCURACY, "pref. accuracy", "max"),
)
"""The columns a leaderboard shows, in order; a table keeps those its runs logged."""
