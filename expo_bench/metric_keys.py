"""Every metric key a run logs, with its display name and direction: named once, here.

Training metrics are ``<stage>/<name>`` (``train/loss``, ``val/rewards_accuracy``: logged by the method modules
through Lightning, ``val/`` on held-out pairs). Evaluation metrics of sampled responses are logged twice: per
sampling temperature (``eval/T0.5/win_rate``, for the win rate vs temperature plot) and, unprefixed
(``eval/win_rate``), at the recipe's leaderboard temperature. ``expo_bench.evaluation.metrics`` returns the names
after ``eval/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Goal = Literal["max", "min"]

TRAIN = "train"
VAL = "val"
EVAL = "eval"
SFT = "sft"


@dataclass(frozen=True)
class Metric:
    """A logged metric: its key, its heading in tables and plots, and whether higher or lower is better."""

    key: str
    title: str
    goal: Goal
    spread: bool = True
    """Show mean ± CI over seeds (False: just the mean, e.g. counts)."""
    directed: bool = True
    """Whether ``goal`` holds; False: neither direction is better (a judge's position bias is best at ½), so the
    metric never ranks or picks configurations."""

    @property
    def name(self) -> str:
        """The key without its stage: ``eval/win_rate`` -> ``win_rate``."""
        return self.key.split("/", 1)[1]


def stage_key(stage: str, name: str) -> str:
    """``stage_key("val", "loss")`` -> ``val/loss``."""
    return f"{stage}/{name}"


SELECTION = "selection"
"""Evaluation metrics on the prompts set aside to pick configurations (``selection/win_rate``): never reported."""


def selection_key(key: str) -> str:
    """``eval/win_rate`` -> ``selection/win_rate``."""
    return stage_key(SELECTION, key.split("/", 1)[1])


def at_temperature(key: str, temperature: float) -> str:
    """``eval/win_rate`` at temperature 0.5 is ``eval/T0.5/win_rate``."""
    prefix, name = key.split("/", 1)
    return f"{prefix}/T{temperature:g}/{name}"


# Names the method modules log under ``train/`` and ``val/`` (see ``expo_bench.methods.base.pair_metrics``).
LOSS = "loss"
LOSS_TERM = "loss_"
"""Prefix of each named loss term when a method's loss has several (``val/loss_kl``)."""
LOGPS_CHOSEN = "logps_chosen"
LOGPS_REJECTED = "logps_rejected"
REWARDS_CHOSEN = "rewards_chosen"
REWARDS_REJECTED = "rewards_rejected"
REWARDS_MARGIN = "rewards_margin"
REWARDS_ACCURACY = "rewards_accuracy"
PREFERENCE_ACCURACY = "preference_accuracy"
ENTROPY = "entropy"
NLL = "nll"
"""Supervised fine-tuning: mean negative log-likelihood per response token (``sft/train_nll``, ``sft/val_nll``)."""

TRAIN_LOSS = stage_key(TRAIN, LOSS)
GRAD_NORM = "grad_norm"
"""The gradients' joint 2-norm before clipping (logged where the stage clips: ``train/grad_norm``, ``sft/grad_norm``)."""
TRAIN_GRAD_NORM = stage_key(TRAIN, GRAD_NORM)
VAL_LOSS = Metric(stage_key(VAL, LOSS), "loss", "min")
VAL_REWARDS_ACCURACY = Metric(stage_key(VAL, REWARDS_ACCURACY), "reward acc.", "max")
VAL_REWARDS_MARGIN = Metric(stage_key(VAL, REWARDS_MARGIN), "log-ratio margin", "max")
VAL_PREFERENCE_ACCURACY = Metric(stage_key(VAL, PREFERENCE_ACCURACY), "pref. accuracy", "max")
VAL_LOGPS_CHOSEN = Metric(stage_key(VAL, LOGPS_CHOSEN), "log π(y_w)", "max")
SFT_VAL_NLL = stage_key(SFT, f"val_{NLL}")
SFT_TRAIN_NLL = stage_key(SFT, f"train_{NLL}")
SFT_GRAD_NORM = stage_key(SFT, GRAD_NORM)

# Evaluation of sampled responses.
WIN_RATE = Metric("eval/win_rate", "win rate", "max")
WIN_RATE_STDERR = Metric("eval/stderr", "win rate s.e.", "min")
WIN_RATE_CI_LOW = Metric("eval/ci_low", "win rate CI low", "max")
WIN_RATE_CI_HIGH = Metric("eval/ci_high", "win rate CI high", "max")
LC_WIN_RATE = Metric("eval/lc_win_rate", "LC win rate", "max")
JUDGED = Metric("eval/n", "judged", "max", spread=False)
INVALID_VERDICTS = Metric("eval/invalid", "invalid verdicts", "min", spread=False)
REWARD = Metric("eval/reward", "reward", "max")
REWARD_STDERR = Metric("eval/reward_stderr", "reward s.e.", "min")
KL = Metric("eval/kl", "KL(π‖π_ref)", "min")
KL_STDERR = Metric("eval/kl_stderr", "KL s.e.", "min")
KL_EXACT = Metric("eval/kl_exact", "exact KL(π‖π_ref)", "min")
"""KL(π‖π_ref) of the policy itself (temperature 1) averaged over the reported prompts, exact: every response up to
``max_new_tokens`` enumerated (the synthetic-token task), where ``eval/kl`` estimates it from samples."""
DISTINCT_2 = Metric("eval/distinct_2_within_prompt", "distinct-2", "max")
SELF_BLEU = Metric("eval/self_bleu_within_prompt", "self-BLEU", "min")
ENTROPY_2 = Metric("eval/entropy_2_across_prompts", "2-gram entropy", "max")
MEAN_LENGTH = Metric("eval/mean_length", "length", "max", spread=False)

# The judges' audit (see ``expo_bench.evaluation.metrics.position_bias_summary`` and ``agreement_summary``).
FIRST_POSITION_WINS = Metric("eval/first_position_wins", "P(first wins)", "max", directed=False)
"""On comparisons judged in both orders: the share of answers that picked the response shown first (½: no bias)."""
SELF_CONSISTENCY = Metric("eval/self_consistency", "self-consistency", "max")
"""On comparisons judged in both orders: the share whose two answers pick the same response."""
SWAPPED = Metric("eval/swapped", "judged both ways", "max", spread=False)

TRUTH = "truth"
"""The label of the task's own ground truth (the synthetic oracle, IMDb's reward model) when it judges alongside."""


def judge_label(index: int) -> str:
    """Several judges are ``j1``, ``j2``, ... in the recipe's order: ``eval/j2/win_rate``, ``eval/j1_j2/kappa``."""
    return f"j{index + 1}"


PER_JUDGE = (REWARD, WIN_RATE, FIRST_POSITION_WINS, SELF_CONSISTENCY)
"""What the leaderboard shows of each judge after the first (``eval/<label>/<name>``)."""
AGREEMENT = Metric("eval/agreement", "agreement", "max")
KAPPA = Metric("eval/kappa", "κ", "max")
BETWEEN_JUDGES = (AGREEMENT, KAPPA)
"""What the leaderboard shows of each pair of judges (``eval/<label>_<label>/<name>``)."""
_LABEL = rf"(?:j\d+|{TRUTH})"


def panel_columns(keys: Iterable[str]) -> list[Metric]:
    """Leaderboard columns for the metrics of several judges among ``keys``: each later judge's win rate and audit,
    then each pair's agreement and κ; titled by the judges' labels."""
    per_judge = {metric.name: metric for metric in PER_JUDGE}
    between = {metric.name: metric for metric in BETWEEN_JUDGES}
    found: list[tuple[int, str, Metric]] = []
    for key in keys:
        if match := re.fullmatch(rf"{EVAL}/({_LABEL})/(\w+)", key):
            label, name = match.groups()
            if name in per_judge:
                known = per_judge[name]
                found.append((0, key, Metric(key, f"{known.title} {label}", known.goal, directed=known.directed)))
        elif match := re.fullmatch(rf"{EVAL}/({_LABEL})_({_LABEL})/(\w+)", key):
            first, second, name = match.groups()
            if name in between:
                known = between[name]
                found.append((1, key, Metric(key, f"{known.title} {first}–{second}", known.goal)))
    return [metric for _, _, metric in sorted(found, key=lambda entry: entry[:2])]


def judge_of(key: str, metric: Metric) -> str | None:
    """The label of the later judge whose ``metric`` ``key`` is (``eval/j2/reward`` -> ``j2``), else None."""
    head, _, name = metric.key.rpartition("/")
    match = re.fullmatch(rf"{re.escape(head)}/({_LABEL})/{re.escape(name)}", key)
    return None if match is None else match.group(1)


def standard_error_key(key: str) -> str:
    """The key of a metric's standard error within one run: ``.../win_rate`` -> ``.../stderr`` (AlpacaEval's name),
    any other ``key`` -> ``key_stderr``."""
    head, _, name = key.rpartition("/")
    return f"{head}/stderr" if name == WIN_RATE.name else f"{key}_stderr"


# Tasks with an exactly known target policy.
KL_TO_TARGET = Metric("eval/kl_target_to_policy", "Σ_x KL(π*‖π)", "min")
"""KL(π_target ‖ π) summed (not averaged) over the reported prompts x: the synthetic tasks' distance to the optimal
policy, over every response (in the synthetic-token task, the held-out ones and those training pairs contain)."""
KL_WELL_FORMED = Metric("eval/kl_target_to_policy_well_formed", "Σ_x KL(π*‖π̃) well-formed", "min")
"""KL(π_target ‖ π̃), π̃ the policy renormalised over well-formed responses, summed over prompts: the distance among
well-formed responses. With :data:`MALFORMED_LEAK` it sums to :data:`KL_TO_TARGET`."""
MALFORMED_LEAK = Metric("eval/malformed_leak", "Σ_x leak −log π(W)", "min")
"""−log π(W) summed over prompts, π(W) the probability of a well-formed response: the part of KL(π_target ‖ π) that
is probability leaked to malformed sequences."""
TOP_RESPONSE_MASS = Metric("eval/top_response_mass", "top-response mass", "max")
"""Mean probability of each prompt's highest-reward response: how far a policy collapsed onto it."""

LEADERBOARD_COLUMNS: tuple[Metric, ...] = (
    WIN_RATE,
    LC_WIN_RATE,
    REWARD,
    KL,
    KL_EXACT,
    KL_TO_TARGET,
    KL_WELL_FORMED,
    MALFORMED_LEAK,
    TOP_RESPONSE_MASS,
    FIRST_POSITION_WINS,
    SELF_CONSISTENCY,
    DISTINCT_2,
    SELF_BLEU,
    ENTROPY_2,
    MEAN_LENGTH,
    VAL_PREFERENCE_ACCURACY,
)
"""The columns a leaderboard shows, in order; a table keeps those its runs logged."""

STANDARD_ERRORS = {WIN_RATE.key: WIN_RATE_STDERR, REWARD.key: REWARD_STDERR, KL.key: KL_STDERR}
"""A metric → its standard error within one run (over prompts and samples): the uncertainty of a single seed."""

HEADLINE = (WIN_RATE, REWARD, KL, KL_TO_TARGET)
"""What a run prints when its evaluation finishes."""

HELD_OUT_COLUMNS = (VAL_LOSS, VAL_REWARDS_ACCURACY, VAL_REWARDS_MARGIN, VAL_PREFERENCE_ACCURACY, VAL_LOGPS_CHOSEN)
"""Held-out pair metrics in a language-model sweep's ``methods.md``."""

CATALOG: dict[str, Metric] = {
    metric.key: metric
    for metric in (
        *LEADERBOARD_COLUMNS,
        *HELD_OUT_COLUMNS,
        *STANDARD_ERRORS.values(),
        WIN_RATE_CI_LOW,
        WIN_RATE_CI_HIGH,
        JUDGED,
        INVALID_VERDICTS,
        SWAPPED,
    )
}
"""Every named metric by key."""


def selected_metric(key: str) -> Metric | None:
    """The reported metric a selection key stands in for: ``selection/win_rate`` -> :data:`WIN_RATE` (None: unknown)."""
    return CATALOG.get(stage_key("eval", key.split("/", 1)[-1]))
