"""Judges with a scalar reward: which of two responses to the same prompt is better, a method's sample (the
candidate) or a baseline's (the reference model's sample or the dataset's chosen response), by comparing rewards
(an exact reward function, a reward model). :mod:`expo_bench.evaluation.llm_judge` asks a chat model instead.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from expo_bench.config_model import ConfigModel, LocalOrHub
from expo_bench.distributed import accelerator_device
from expo_bench.evaluation.llm_judge import LLMJudgeConfig
from expo_bench.evaluation.reward_models import HFRewardModel, RewardModel
from expo_bench.evaluation.types import Comparison, Verdict
from expo_bench.reporting import Done


class RewardJudge(ABC):
    """A judge with a scalar reward: the candidate wins when its reward is higher; equal rewards tie."""

    name: str
    gives_rewards = True

    @abstractmethod
    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...

    def judge(self, comparisons: Sequence[Comparison], done: Done | None = None) -> list[Verdict]:
        # Each distinct (prompt, response) scored once, in one call so a reward model fills its batches: identical
        # responses then tie exactly (padding in a batch perturbs a model's logits in the last bits).
        pairs = [(c.prompt, c.candidate) for c in comparisons] + [(c.prompt, c.baseline) for c in comparisons]
        unique = list(dict.fromkeys(pairs))
        scores = self.rewards([prompt for prompt, _ in unique], [response for _, response in unique])
        reward = dict(zip(unique, scores, strict=True))
        verdicts = []
        for c in comparisons:
            ours, theirs = reward[c.prompt, c.candidate], reward[c.prompt, c.baseline]
            verdicts.append(Verdict(_compare(ours, theirs), {"candidate_reward": ours, "baseline_reward": theirs}, ours))
        if done is not None:
            done(len(verdicts))
        return verdicts


def _compare(candidate: float, baseline: float) -> float:
    if math.isnan(candidate) or math.isnan(baseline):
        return math.nan
    return 1.0 if candidate > baseline else 0.0 if candidate < baseline else 0.5


class OracleJudge(RewardJudge):
    """The exact reward ``reward(prompt, response)`` of a synthetic task."""

    def __init__(self, reward: Callable[[str, str], float], name: str = "oracle") -> None:
        self.reward, self.name = reward, name

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self.reward(prompt, response)) for prompt, response in zip(prompts, responses, strict=True)]


class RewardModelJudge(RewardJudge):
    """A reward model scoring each prompt followed by its response as one text."""

    def __init__(self, model: RewardModel) -> None:
        self.model, self.name = model, model.name

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.model.score([prompt + response for prompt, response in zip(prompts, responses, strict=True)])


class RewardModelJudgeConfig(ConfigModel):
    """A Hugging Face reward model (one output logit) scores prompt + response; the higher reward wins."""

    kind: Literal["reward_model"] = "reward_model"
    name_or_path: LocalOrHub = Field(min_length=1)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(1024, gt=0)
    """Tokens per scored text; longer ones keep their end (the response)."""

    def build(self, cache_dir: Path, seed: int) -> RewardModelJudge:
        return RewardModelJudge(HFRewardModel(self.name_or_path, self.batch_size, self.max_length, accelerator_device()))

    def check_reachable(self, cache_dir: Path) -> None:
        """Nothing to reach: the model is loaded (locally or from the hub cache) when the run evaluates."""


JudgeConfig = Annotated[LLMJudgeConfig | RewardModelJudgeConfig, Field(discriminator="kind")]
