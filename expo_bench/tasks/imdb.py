"""IMDb controlled sentiment (the DPO paper's pipeline): SFT on reviews, sample completions of short
review prefixes from the SFT model, label pairs with a sentiment reward model, then every method."""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator
from rich.console import Console

from expo_bench import metric_keys
from expo_bench.cache import cached
from expo_bench.config_model import ConfigModel, LocalOrHub
from expo_bench.distributed import accelerator_device, rank_zero_first
from expo_bench.errors import DataError
from expo_bench.evaluation.judges import RewardModelJudge
from expo_bench.evaluation.reward_models import HFSentimentClassifier, NaiveBayesSentiment, RewardModel, TfidfSentiment
from expo_bench.lm import imdb
from expo_bench.lm.fitted_tokenizer import FittedTokenizer
from expo_bench.lm.imdb import Labelling, Review, load_reviews
from expo_bench.lm.ngram import bigram_nll
from expo_bench.lm.pairs import PromptPair, require_records
from expo_bench.lm.sampling import SamplingConfig
from expo_bench.lm.tokenize import TokenizedPair, tokenize_pair, unseen_prompts
from expo_bench.metric_keys import Metric
from expo_bench.tasks.language_model import LanguageModelTask, SFTExamples, TaskData

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class RewardModelConfig(ConfigModel):
    """A sentiment reward: ``tfidf`` (word TF-IDF logistic regression) or ``naive_bayes`` (character n-gram naive
    Bayes), both fitted here on IMDb training reviews and cached, or a ``huggingface`` sequence classifier (the DPO
    paper used siebert/sentiment-roberta-large-english)."""

    kind: Literal["tfidf", "naive_bayes", "huggingface"] = "tfidf"
    name_or_path: LocalOrHub = "siebert/sentiment-roberta-large-english"
    fold: tuple[int, int] | None = None
    """``[k, n]``: fit on the training reviews in fold k of n, a review's fold fixed by a hash of its id (the files are
    sorted by label, so a prefix of them is one-sided); unset: every training review. Two scorers fitted on different
    folds of one n never saw each other's reviews."""
    train_reviews: int | None = Field(None, gt=0)
    """Fit on the first this many training reviews (of the fold; all when unset)."""
    added_later: ClassVar[frozenset[str]] = frozenset({"fold"})

    @model_validator(mode="after")
    def _fold_in_range(self) -> RewardModelConfig:
        if self.fold is not None and not 0 <= self.fold[0] < self.fold[1]:
            raise ValueError(f"fold must be [k, n] with 0 <= k < n, got {list(self.fold)}")
        return self

    @property
    def fitted_here(self) -> bool:
        return self.kind != "huggingface"

    def fitting_reviews(self, reviews: Sequence[Review]) -> list[Review]:
        """The training reviews this scorer is fitted on."""
        chosen = list(reviews) if self.fold is None else [review for review in reviews if in_fold(review.id, *self.fold)]
        return chosen[: self.train_reviews]

    def build(self, reviews: Sequence[Review], seed: int, cache_dir: Path) -> RewardModel:
        if not self.fitted_here:
            return HFSentimentClassifier(self.name_or_path, device=accelerator_device())
        model_class = FITTED_HERE[self.kind]
        subset = self.fitting_reviews(reviews)
        digest = hashlib.sha256(("|".join(review.id for review in subset) + f"|{seed}").encode()).hexdigest()[:16]
        path = cache_dir / f"sentiment-{self.kind}-{digest}.skops"
        with rank_zero_first():  # rank zero trains and saves it, the other ranks load its file
            if path.exists():
                return model_class.load(path)
            model = model_class.train(subset, seed)
            cache_dir.mkdir(parents=True, exist_ok=True)
            model.save(path)
            return model


FITTED_HERE: dict[str, type[TfidfSentiment] | type[NaiveBayesSentiment]] = {
    "tfidf": TfidfSentiment,
    "naive_bayes": NaiveBayesSentiment,
}


def in_fold(review_id: str, k: int, n: int) -> bool:
    """Whether a review is in fold k of n: by the sha256 of its id, so the split is the same in every run and seed."""
    return int(hashlib.sha256(review_id.encode()).hexdigest()[:8], 16) % n == k


def independence_problem(labeller: RewardModelConfig, second: RewardModelConfig) -> str | None:
    """Why ``second`` is not independent of the labelling reward model, or None: fitted here, it must be fitted on a
    fold of the training reviews the labeller's fold excludes; from the hub, it must be another model."""
    if labeller.fitted_here != second.fitted_here:
        return None
    if not labeller.fitted_here:
        return None if labeller.name_or_path != second.name_or_path else f"both are {second.name_or_path}"
    folds = labeller.fold, second.fold
    if None in folds or folds[0][1] != folds[1][1] or folds[0][0] == folds[1][0]:  # type: ignore[index]
        return (
            "both are fitted on IMDb training reviews, so each needs its own fold of one split: e.g. "
            "reward_model.fold [0, 2] and second_reward_model.fold [1, 2]"
        )
    return None


def review_example(tokenizer: PreTrainedTokenizerBase, review: Review, max_length: int) -> TokenizedPair:
    """A review as an SFT example: the whole text is the response to an empty prompt (one EOS token as the
    document start), so every review token is in the loss. The rejected side is unused by SFT."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(review.text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedPair([eos], [*ids, eos][: max_length - 1], [eos], False, len(ids) + 1 > max_length - 1)


class IMDbTask(LanguageModelTask):
    """IMDb reviews from the hub (``stanfordnlp/imdb``) or local jsonl files (``train``/``test`` splits)."""

    kind: Literal["imdb"]
    has_own_judge: ClassVar[bool] = True
    rank_by: ClassVar[Metric] = metric_keys.REWARD
    tokenizer: LocalOrHub | FittedTokenizer = "gpt2-large"
    source: str = imdb.HUB_ID
    train_split: str = "train"
    eval_split: str = "test"
    skip_malformed: bool = False
    sft_reviews: int | None = Field(None, gt=0)
    """SFT on this many training reviews (shuffled by seed; all when unset)."""
    train_prompts: int = Field(1000, gt=0)
    eval_prompts: int = Field(100, gt=0)
    prompt_tokens: tuple[int, int] = (2, 8)
    """Prompts are the first n tokens of a review, n uniform in this range (the DPO paper's 2-8)."""
    completions: SamplingConfig = SamplingConfig(samples_per_prompt=4, max_new_tokens=48)
    """How many completions of each prompt the SFT model samples, and how long, to build pairs from."""
    reward_model: RewardModelConfig = RewardModelConfig()
    margin: float = Field(0.1, gt=0)
    """Keep a pair of completions only if their rewards (P(positive)) differ by at least this much."""
    second_reward_model: RewardModelConfig | None = None
    """An independent sentiment scorer that judges every evaluated policy beside the labelling reward model and is
    never used to label or train: its reward and win rate are reported as ``eval/j2/reward`` and ``eval/j2/win_rate``,
    with the two scorers' agreement. A gain the labeller sees and this scorer does not is reward hacking."""

    @model_validator(mode="after")
    def _source_exists(self) -> IMDbTask:
        if self.source != imdb.HUB_ID and not Path(self.source).exists():
            raise ValueError(f"source {self.source!r} is neither an existing file or folder nor the hub id {imdb.HUB_ID!r}")
        if self.source != imdb.HUB_ID:
            for split in dict.fromkeys((self.train_split, self.eval_split)):
                try:
                    require_records(Path(self.source), split)
                except DataError as error:
                    raise ValueError(str(error)) from None
        if self.second_reward_model is not None and (why := independence_problem(self.reward_model, self.second_reward_model)):
            raise ValueError(f"second_reward_model must be independent of reward_model: {why}")
        low, high = self.prompt_tokens
        if not 1 <= low <= high:
            raise ValueError(f"prompt_tokens must be [low, high] with 1 <= low <= high, got {list(self.prompt_tokens)}")
        return self

    @property
    def dataset(self) -> str:
        return "imdb"

    def tokenizer_texts(self) -> list[str]:
        """Every training review: what SFT trains on and ``tokenizer: {fit: ...}`` is fitted to."""
        return [review.text for review in _load(self.source, self.train_split, self.skip_malformed)]

    def _reviews(self, seed: int) -> tuple[list[Review], list[Review], list[Review]]:
        """All training reviews, and the training and held-out reviews shuffled by seed."""
        train_reviews = _load(self.source, self.train_split, self.skip_malformed)
        shuffled, held_out = list(train_reviews), list(_load(self.source, self.eval_split, self.skip_malformed))
        for split, reviews in ((self.train_split, shuffled), (self.eval_split, held_out)):
            if not reviews:
                raise DataError(f"{self.source}: no usable reviews in split {split!r}")
        random.Random(seed).shuffle(shuffled)
        random.Random(seed + 1).shuffle(held_out)
        return list(train_reviews), shuffled, held_out

    def sft_examples(self, seed: int, tokenizer: PreTrainedTokenizerBase, console: Console) -> SFTExamples:
        if self.sft is None:
            return SFTExamples([], [])
        _, shuffled, held_out = self._reviews(seed)
        max_length = self.tokenization.max_length
        return SFTExamples(
            [review_example(tokenizer, review, max_length) for review in shuffled[: self.sft_reviews]],
            [review_example(tokenizer, review, max_length) for review in held_out[: self.eval_prompts]],
        )

    def task_data(
        self,
        seed: int,
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel,
        sft: SFTExamples,
        cache_dir: Path,
        console: Console,
    ) -> TaskData:
        from expo_bench.lm.data import fingerprint_module  # Lightning: not needed to validate a recipe

        train_reviews, shuffled, held_out = self._reviews(seed)
        prompt_reviews = shuffled[: self.train_prompts], held_out[: self.eval_prompts]
        key = {
            "sft_model": fingerprint_module(reference),
            "reviews": [hashlib.sha256("|".join(r.id for r in reviews).encode()).hexdigest()[:16] for reviews in prompt_reviews],
            "settings": self.model_dump(include={"prompt_tokens", "completions", "reward_model", "margin"}, mode="json"),
            "seed": seed,
        }

        labelling = Labelling(self.prompt_tokens, self.completions, self.margin)

        def label() -> dict[str, Any]:
            reward = self.reward_model.build(train_reviews, seed, cache_dir)
            return labelling.label(tokenizer, reference, reward, prompt_reviews, seed, console)

        labelled, hit = cached(cache_dir, "imdb-pairs", key, label)
        console.print(
            f"seed {seed}: {'cached ' if hit else ''}training pairs from {labelled['labeling']}; "
            f"held-out pairs from {labelled['eval_labeling']}"
        )
        for split, report in (("train", "labeling"), ("evaluation", "eval_labeling")):
            if not labelled[split]:
                raise DataError(
                    f"task.margin: no {split} pair left from {labelled[report]}: {labelled['reward_model']} scores the "
                    f"completions within {self.margin:g} of each other; lower task.margin or sample more completions"
                )
        train, evaluation = (
            [tokenize_pair(tokenizer, PromptPair(*texts), self.tokenization) for texts in labelled[split]]
            for split in ("train", "evaluation")
        )
        # a 2-8 token prefix of a test review can equal a training prefix ("This movie"): held out means unseen
        kept = unseen_prompts(evaluation, train)
        provenance = {key: labelled[key] for key in ("reward_model", "labeling", "eval_labeling")}
        provenance["held_out_pairs_dropped_as_training_prompts"] = len(evaluation) - len(kept)
        evaluation = kept
        if sft.train and sft.held_out:
            provenance["bigram_val_nll"] = bigram_nll(sft.train, sft.held_out, len(tokenizer))
        scorers = [self.reward_model, *([] if self.second_reward_model is None else [self.second_reward_model])]
        judges = (
            () if self.evaluation is None else tuple(RewardModelJudge(s.build(train_reviews, seed, cache_dir)) for s in scorers)
        )
        return TaskData(train, evaluation, provenance, judges=judges)


@functools.lru_cache(maxsize=4)
def _load(source: str, split: str, skip_malformed: bool) -> tuple[Review, ...]:
    """Reviews read once per process: the SFT examples and the pairs of a seed come from the same reviews."""
    return tuple(load_reviews(source, split, skip_malformed))
