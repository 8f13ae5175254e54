"""Judges: which of two responses to the same prompt is better, a method's sample (the candidate) or a baseline's
(the reference model's sample or the dataset's chosen response).

Judges with a scalar reward (an exact reward function, a reward model) compare rewards; :class:`LLMJudgeConfig`
asks a chat model (:mod:`expo_bench.evaluation.llm_judge`).
"""

from __future__ import annotations

import math
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import torch
from pydantic import Field, field_validator

from expo_bench.config_model import ConfigModel
from expo_bench.lm.sentiment import classifier_logits
from expo_bench.lm.tokenize import pad_token_id

if TYPE_CHECKING:
    from expo_bench.evaluation.llm_judge import LLMJudge
    from expo_bench.lm.sentiment import RewardModel


@dataclass(frozen=True)
class Comparison:
    prompt: str
    candidate: str
    baseline: str


@dataclass(frozen=True)
class Verdict:
    outcome: float
    """1 the candidate wins, 0 it loses, 0.5 a tie, NaN when the judge's answer could not be parsed."""
    detail: dict[str, Any]
    """JSON-serializable and judge-specific: rewards, or the LLM's raw answer and the candidate's position."""


class Judge(Protocol):
    """Compares candidates with baselines; ``name`` goes into results' provenance."""

    name: str

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]: ...


class RewardJudge(ABC):
    """A judge with a scalar reward: the candidate wins when its reward is higher; equal rewards tie."""

    name: str

    @abstractmethod
    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]:
        # Each distinct (prompt, response) scored once, in one call so a reward model fills its batches: identical
        # responses then tie exactly (padding in a batch perturbs a model's logits in the last bits).
        pairs = [(c.prompt, c.candidate) for c in comparisons] + [(c.prompt, c.baseline) for c in comparisons]
        unique = list(dict.fromkeys(pairs))
        scores = self.rewards([prompt for prompt, _ in unique], [response for _, response in unique])
        reward = dict(zip(unique, scores, strict=True))
        verdicts = []
        for c in comparisons:
            ours, theirs = reward[c.prompt, c.candidate], reward[c.prompt, c.baseline]
            verdicts.append(Verdict(_compare(ours, theirs), {"candidate_reward": ours, "baseline_reward": theirs}))
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


class HFRewardModel:
    """A Hugging Face sequence classifier with one output: its logit is the reward of the text."""

    def __init__(
        self, name_or_path: str, batch_size: int = 16, max_length: int = 1024, device: str | torch.device = "cpu"
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        self.name = name_or_path
        self.batch_size, self.max_length, self.device = batch_size, max_length, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        # The judged response is at the end of the text: an over-long text loses the start of its prompt instead.
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{name_or_path}: a reward model has one output, this one has {self.model.config.num_labels}")
        if self.tokenizer.pad_token is None:  # GPT-2 and Pythia have none; padding is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # decoder classifiers find each row's last token by the pad id
            self.model.config.pad_token_id = pad_token_id(self.tokenizer)

    def score(self, texts: Sequence[str]) -> list[float]:
        """The reward of each text; texts over ``max_length`` tokens are scored on their last tokens."""
        logits = classifier_logits(self.tokenizer, self.model, texts, self.batch_size, self.max_length, self.device)
        return logits[:, 0].tolist()


DPO_DIALOGUE_TEMPLATE = (
    "For the following query to a chatbot, which response is more helpful?\n"
    "Query: {prompt}\n"
    "Response A:\n{response_a}\n"
    "Response B:\n{response_b}\n"
    "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
    'SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. '
    "Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    'More helpful: <"A" or "B">'
)
"""The DPO paper's GPT-4 helpfulness prompt for dialogue (Rafailov et al. 2023, Appendix C.2)."""

TEMPLATE_FIELDS = {"prompt", "response_a", "response_b"}


class LLMJudgeConfig(ConfigModel):
    """A chat model behind an OpenAI-compatible endpoint (``{base_url}/chat/completions``) picks the better response.

    The API key is read from the environment variable ``api_key_env`` when sending (null: no authentication).
    Every answer is cached under the run's cache folder, so an interrupted evaluation resumes without paying twice.
    """

    kind: Literal["llm"] = "llm"
    base_url: str = Field("https://api.openai.com/v1", pattern=r"^https?://")
    model: str = Field(min_length=1)
    api_key_env: str | None = "OPENAI_API_KEY"
    template: str = DPO_DIALOGUE_TEMPLATE
    """The user message: ``{prompt}``, ``{response_a}`` and ``{response_b}`` are filled in (write literal braces twice)."""
    choice_label: str = Field("More helpful", min_length=1)
    """The answer must hold exactly one line ``<choice_label>: A`` or ``... B`` (the DPO summarization prompt: ``Preferred``)."""
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, gt=0)
    max_concurrency: int = Field(4, gt=0)
    max_retries: int = Field(6, ge=0)
    """Retries of a request after HTTP 429, 5xx, a timeout or a connection error."""
    backoff: float = Field(1.0, ge=0)
    """Seconds before the first retry, doubling with each (a server's Retry-After takes precedence)."""
    timeout: float = Field(120.0, gt=0)
    """Seconds to wait for one response."""

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, base_url: str) -> str:
        return base_url.rstrip("/")

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str) -> str:
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
        except ValueError as error:
            raise ValueError(f"not a format string ({error}); write literal braces as {{{{ and }}}}") from None
        if fields != TEMPLATE_FIELDS:
            raise ValueError(f"expected the fields {sorted(TEMPLATE_FIELDS)}, got {sorted(fields)}")
        return template

    def build(self, cache_dir: Path, seed: int) -> LLMJudge:
        from expo_bench.evaluation.llm_judge import LLMJudge  # that module imports this one's types

        return LLMJudge(self, cache_dir / "llm-judge", seed)


class RewardModelJudgeConfig(ConfigModel):
    """A Hugging Face reward model (one output logit) scores prompt + response; the higher reward wins."""

    kind: Literal["reward_model"] = "reward_model"
    name_or_path: str = Field(min_length=1)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(1024, gt=0)
    """Tokens per scored text; longer ones keep their end (the response)."""

    def build(self, cache_dir: Path, seed: int) -> RewardModelJudge:
        from expo_bench.lm.model import accelerator_device  # imports peft, which the other judges do not need

        return RewardModelJudge(HFRewardModel(self.name_or_path, self.batch_size, self.max_length, accelerator_device()))


JudgeConfig = Annotated[LLMJudgeConfig | RewardModelJudgeConfig, Field(discriminator="kind")]
