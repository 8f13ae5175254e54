"""What every language-model task shares: its recipe fields (model, tokenizer, SFT, reference handling, LoRA,
evaluation) and the two steps a task supplies, its SFT examples and, from the SFT model, its preference pairs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import field_validator, model_validator
from rich.console import Console

from expo_bench import metric_keys
from expo_bench.config_model import LocalOrHub
from expo_bench.evaluation.types import Judge
from expo_bench.lm.evaluator import EvaluationConfig, ExactMetrics, HeldOutPrompts
from expo_bench.lm.fitted_tokenizer import FittedTokenizer
from expo_bench.lm.model import LoraSettings, ModelConfig, ReferenceKind
from expo_bench.lm.sampling import SamplingConfig
from expo_bench.lm.tokenize import TokenizationConfig, TokenizedPair
from expo_bench.methods.base import KL_SAMPLES
from expo_bench.metric_keys import Metric
from expo_bench.tasks.base import TaskBase
from expo_bench.train_config import Machine, TrainConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SFTExamples:
    """What the SFT stage fine-tunes on (the chosen side of each pair) and measures held-out NLL on."""

    train: list[TokenizedPair]
    held_out: list[TokenizedPair]


@dataclass(frozen=True)
class TaskData:
    """A task's data for one seed: tokenized training and held-out pairs, and how to judge its policies."""

    train: list[TokenizedPair]
    evaluation: list[TokenizedPair]
    provenance: Mapping[str, str | int | float] = field(default_factory=dict)
    """Task-specific facts recorded with every run (e.g. how IMDb's pairs were labelled)."""
    judges: tuple[Judge, ...] = ()
    """The task's own judges, used when the recipe names none: the ground truth (a reward model, an oracle) first, then
    any independent scorer beside it (IMDb's second reward model)."""
    exact: ExactMetrics | None = None
    test: HeldOutPrompts | None = None
    """Evaluation prompts with reference responses of their own (AlpacaEval-style); None: each distinct held-out
    prompt with its first chosen response."""
    prompt_texts: Mapping[tuple[int, ...], str] = field(default_factory=dict)
    """Prompt ids → the prompt as a person reads it (a conversation as ``User: ...`` paragraphs, untruncated): what
    an LLM judge is shown of a held-out prompt instead of its decoded, chat-templated ids."""


class LanguageModelTask(TaskBase):
    """A preference task for causal language models. A subclass names its ``kind`` and supplies
    :meth:`sft_examples` and :meth:`task_data`."""

    tokenizer: LocalOrHub | FittedTokenizer
    """A tokenizer from the hub or a local folder, or ``{fit: {vocab_size: 4096}}``: byte-level BPE fitted to the task's
    training texts (cached), where the task has some of its own (IMDb's reviews)."""
    tokenization: TokenizationConfig = TokenizationConfig()
    model: ModelConfig
    sft: TrainConfig | None = None
    """Supervised fine-tuning first; its result is the reference and every method's start."""
    sft_seed: int | None = None
    """Build and fine-tune one SFT model from this seed for every seed of the recipe (the DPO paper's one SFT model):
    seeds then vary the pairs, training and evaluation draws, not the reference. Unset: each seed its own SFT model."""
    reference_samples: SamplingConfig | None = None
    """Sample responses from the reference (the SFT model) once per seed and cache them: EXPO's
    ``kl_estimator: reference_samples`` estimates KL(π_ref ‖ π) on them."""
    redraw_reference_samples: bool = False
    """Fresh reference samples for every epoch (drawn up front, ``samples_per_prompt`` per epoch): the KL term then
    pulls the policy toward π_ref itself rather than toward one fixed set of its samples."""
    lora: LoraSettings | None = None
    """Train a LoRA adapter on the policy instead of all its weights."""
    reference: ReferenceKind = "cached"
    """``cached``: reference log-probs computed once per seed, reused by every method, no reference in
    memory; ``frozen_copy``: a frozen copy runs forward on every batch; ``adapter_disabled``: the policy
    with its LoRA adapter switched off (needs ``lora``), no second copy."""

    evaluation: EvaluationConfig | None = None
    """Sample every trained policy on the evaluation prompts (held out from training, except in the synthetic-token
    task, which holds out responses) and judge the samples (win rate, diversity, reward, KL)."""
    added_later: ClassVar[frozenset[str]] = frozenset({"sft_seed"})
    has_own_judge: ClassVar[bool] = False
    """Whether :meth:`task_data` supplies a ground-truth judge, so ``evaluation.judge`` may be left unset."""
    rank_by: ClassVar[Metric] = metric_keys.WIN_RATE
    """The metric that picks a method's best configuration on the leaderboard."""

    @field_validator("reference_samples")
    @classmethod
    def _from_the_reference_itself(cls, sampling: SamplingConfig | None) -> SamplingConfig | None:
        if sampling is not None and not sampling.untruncated:
            raise ValueError(
                "reference samples estimate KL(π_ref ‖ π), so they must come from π_ref itself: "
                f"temperature 1, top_p 1, top_k 0 (got temperature {sampling.temperature:g}, top_p {sampling.top_p:g}, "
                f"top_k {sampling.top_k})"
            )
        return sampling

    @model_validator(mode="after")
    def _lora_reference(self) -> LanguageModelTask:
        if isinstance(self.tokenizer, FittedTokenizer) and type(self).tokenizer_texts is LanguageModelTask.tokenizer_texts:
            raise ValueError(
                "tokenizer: this task kind has no texts of its own to fit a tokenizer to: name one (a hub id or a folder)"
            )
        if self.redraw_reference_samples and self.reference_samples is None:
            raise ValueError("redraw_reference_samples needs reference_samples to redraw")
        if self.reference == "adapter_disabled" and self.lora is None:
            raise ValueError("reference 'adapter_disabled' needs a LoRA policy: add lora: {r: 16}")
        if self.evaluation is not None and not self.evaluation.panel and not self.has_own_judge:
            raise ValueError("this task has no ground-truth judge of its own: set evaluation.judge (kind: llm or reward_model)")
        if self.evaluation is not None and self.evaluation.calibrate and not (self.has_own_judge and self.evaluation.panel):
            raise ValueError(
                "evaluation.calibrate compares the recipe's judges with the task's own ground truth: it needs a task that "
                "has one (synthetic_tokens, imdb) and evaluation.judge or evaluation.judges to compare"
            )
        return self

    @property
    def dataset(self) -> str:
        """The dataset's name in the tracking store: the leaderboard has one table per dataset."""
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        tiny = self.model.tiny or {}
        return self.model.name_or_path or f"tiny {tiny.get('model_type')}"

    def load_tokenizer(self, cache_dir: Path | None = None) -> Any:
        """The tokenizer; ``cache_dir`` keeps what a task builds for itself (a fitted tokenizer)."""
        from transformers import AutoTokenizer

        if isinstance(self.tokenizer, FittedTokenizer):
            return self.tokenizer.fit.tokenizer(self.tokenizer_texts(), cache_dir)
        return AutoTokenizer.from_pretrained(self.tokenizer)

    def tokenizer_texts(self) -> list[str]:
        """The texts ``tokenizer: {fit: ...}`` is fitted to; a task without texts of its own to fit one leaves this."""
        raise NotImplementedError

    trains_with_lightning: ClassVar[bool] = True

    def instance_count(self) -> int:
        return len(self.task_instances())

    def own_stages(self) -> list[tuple[str, TrainConfig]]:
        return [] if self.sft is None else [("task.sft", self.sft)]

    def machine_problems(self, machine: Machine) -> list[tuple[str, str]]:
        return [(f"task.model.{field}", why) for field, why in self.model.machine_problems(machine.gpus, machine.packages)]

    def master_weights_problems(self, path: str, precision: str) -> list[tuple[str, str]]:
        if self.model.dtype == "float32":
            return []
        why = (
            f"{self.model.dtype} master weights under {path}.precision {precision}: mixed precision keeps float32 "
            "master weights (set float32, or a -true precision to train in 16 bits throughout)"
        )
        return [("task.model.dtype", why)]

    def check_judges(self, cache_dir: Path) -> None:
        for judge in [] if self.evaluation is None else self.evaluation.panel:
            judge.check_reachable(cache_dir)

    def task_instances(self) -> list[tuple[str | None, LanguageModelTask]]:
        """The task instances a recipe runs, each with its name: by default the task itself, unnamed (one instance,
        runs untagged). Seeds are nested in an instance; the leaderboard pairs seeds within one and instances across."""
        return [(None, self)]

    def provides(self) -> frozenset[str]:
        """Optional batch fields the data carries: reference samples when ``reference_samples`` is set."""
        return frozenset({KL_SAMPLES}) if self.reference_samples is not None else frozenset()

    def sft_examples(self, seed: int, tokenizer: PreTrainedTokenizerBase, console: Console) -> SFTExamples:
        """This seed's SFT data (the sweep fine-tunes on it only when ``sft`` is set)."""
        raise NotImplementedError

    def task_data(
        self,
        seed: int,
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel,
        sft: SFTExamples,
        cache_dir: Path,
        console: Console,
    ) -> TaskData:
        """This seed's preference pairs, given the reference (the SFT model) and the SFT examples."""
        raise NotImplementedError
