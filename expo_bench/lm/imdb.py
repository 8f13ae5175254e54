"""IMDb reviews for the controlled-sentiment task (DPO paper §6.1): review prefixes as prompts, pairs labeled by a reward.

The pipeline: prompts are the first 2–8 tokens of a review; the SFT model samples k completions per prompt;
a sentiment classifier scores them; every pair of completions whose scores differ by at least a margin
becomes a preference pair, the higher score chosen (:class:`Labelling`). The same classifier is the ground-truth
reward at evaluation.
"""

from __future__ import annotations

import html
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expo_bench.errors import DataError
from expo_bench.evaluation.reward_models import RewardModel
from expo_bench.lm.model import on_accelerator
from expo_bench.lm.pairs import PromptPair, json_object, jsonl_lines, split_file
from expo_bench.lm.sampling import SamplingConfig, sample_responses
from expo_bench.lm.tokenize import pad_token_id
from expo_bench.reporting import progress

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HUB_ID = "stanfordnlp/imdb"
EXPECTED = "a JSON object with string 'text', 'label' 0 or 1 and, if present, string 'id'"

_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
# Only tag-shaped text (a letter after "<") is markup: "<3", "<=8" and "<<" in reviews are words, not tags.
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_WHITESPACE = re.compile(r"\s+")


def clean_review(text: str) -> str:
    """Plain text: line breaks become spaces, other tags go, entities are unescaped, whitespace runs collapse.

    Tags are stripped before unescaping so an escaped ``&lt;i&gt;`` stays as literal text. Paragraph breaks
    are not kept: prompts are 2–8 tokens and the sentiment classifiers ignore layout.
    """
    text = _TAG.sub("", _LINE_BREAK.sub(" ", text))
    return _WHITESPACE.sub(" ", html.unescape(text)).strip()


@dataclass(frozen=True)
class Review:
    """One labeled review, its text cleaned; ``label`` is 0 (negative, rating ≤ 4) or 1 (positive, ≥ 7)."""

    id: str
    text: str
    label: int


def _review(row: str | dict[str, Any], fallback_id: str) -> Review:
    """The review in a JSONL line or a hub row, or ValueError saying what is wrong with it."""
    row = json_object(row) if isinstance(row, str) else row
    text, label, review_id = row.get("text"), row.get("label"), row.get("id", fallback_id)
    if not isinstance(text, str):
        raise ValueError(f"'text' is {'missing' if 'text' not in row else type(text).__name__}")
    if type(label) is not int or label not in (0, 1):  # bool is an int subclass; True is not a label
        raise ValueError(f"'label' is {'missing' if 'label' not in row else repr(label)}")
    if not isinstance(review_id, str):
        raise ValueError(f"'id' is {type(review_id).__name__}")
    return Review(review_id, clean_review(text), label)


def _hub_rows(split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) from the hub dataset; ``datasets`` is imported here because only this path needs it."""
    import datasets

    rows: Iterable[dict[str, Any]] = datasets.load_dataset(HUB_ID, split=split)
    yield from ((f"{HUB_ID} split {split!r}, row {index}", row) for index, row in enumerate(rows))


def load_reviews(source: str, split: str, skip_malformed: bool = False) -> list[Review]:
    """Cleaned reviews from a local file or folder (e.g. ``shared/data/imdb``, ``test_sample``) or the hub.

    ``source`` is a local path if one exists, else it must be the hub id ``stanfordnlp/imdb``. A record
    without ``id`` (the hub's rows) gets ``"<split>/<index>"``. A malformed record is a :class:`DataError`
    naming where it is, or, with ``skip_malformed``, skipped with one warning giving the count.
    """
    local = Path(source)
    if local.exists():
        rows: Iterator[tuple[str, str | dict[str, Any]]] = jsonl_lines(split_file(local, split))
    elif source == HUB_ID:
        rows = _hub_rows(split)
    else:
        raise DataError(f"{source}: no such file or folder, and not the hub dataset id {HUB_ID!r}")
    reviews, malformed = [], 0
    for index, (where, row) in enumerate(rows):
        try:
            reviews.append(_review(row, f"{split}/{index}"))
        except ValueError as error:
            if not skip_malformed:
                raise DataError(f"{where}: expected {EXPECTED}, got {error}") from None
            malformed += 1
    if malformed:
        warnings.warn(f"{source} split {split!r}: skipped {malformed} malformed records", stacklevel=2)
    return reviews


def make_prompts(
    reviews: Sequence[Review], tokenizer: PreTrainedTokenizerBase, min_tokens: int = 2, max_tokens: int = 8, seed: int = 0
) -> list[list[int]]:
    """The first n tokens of each review (no special tokens), n uniform in [min_tokens, max_tokens] per review.

    A review shorter than n tokens is used whole. The same seed gives the same lengths for the same reviews.
    With a byte-level tokenizer a prefix may end inside a multi-byte character; the ids stay valid prompts.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}")
    rng = random.Random(seed)
    texts = [review.text for review in reviews]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [list(ids[: rng.randint(min_tokens, max_tokens)]) for ids in encoded]


@dataclass
class PreferenceLabelingReport:
    """What labeling kept: ``candidate_pairs`` counts every unordered pair of completions of a prompt."""

    prompts: int = 0
    candidate_pairs: int = 0
    kept_pairs: int = 0
    identical_pairs: int = 0
    margin: float = 0.0

    def summary(self) -> str:
        below = self.candidate_pairs - self.kept_pairs - self.identical_pairs
        return (
            f"{self.prompts} prompts, {self.candidate_pairs} candidate pairs: kept {self.kept_pairs}, "
            f"dropped {self.identical_pairs} identical and {below} with reward gap below {self.margin:g}"
        )


def label_pairs(
    prompts_text: list[str], completions: list[list[str]], rewards: list[list[float]], margin: float
) -> tuple[list[PromptPair], PreferenceLabelingReport]:
    """Every pair of a prompt's completions whose rewards differ by at least ``margin``, the higher one chosen.

    ``margin`` must be positive so no pair is ordered by a tie. Identical completions are never paired:
    their preference carries no signal. Pairs come prompt by prompt, in completion order.
    """
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    if not len(prompts_text) == len(completions) == len(rewards):
        raise ValueError(f"{len(prompts_text)} prompts, {len(completions)} completion lists, {len(rewards)} reward lists")
    report = PreferenceLabelingReport(prompts=len(prompts_text), margin=margin)
    pairs = []
    for index, (prompt, texts, scores) in enumerate(zip(prompts_text, completions, rewards, strict=True)):
        if len(texts) != len(scores):
            raise ValueError(f"prompt {index}: {len(texts)} completions but {len(scores)} rewards")
        for (first, first_score), (second, second_score) in combinations(zip(texts, scores, strict=True), 2):
            report.candidate_pairs += 1
            if first == second:
                report.identical_pairs += 1
            elif abs(first_score - second_score) >= margin:
                chosen, rejected = (first, second) if first_score > second_score else (second, first)
                pairs.append(PromptPair(prompt, chosen, rejected))
    report.kept_pairs = len(pairs)
    return pairs, report


@dataclass(frozen=True)
class Labelling:
    """How preference pairs are made from reviews: each review's 2–8 token prefix is a prompt, the SFT model samples
    completions of it, the reward model scores prefix + completion, and :func:`label_pairs` keeps pairs by margin."""

    prompt_tokens: tuple[int, int]
    completions: SamplingConfig
    margin: float

    def label(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        reward: RewardModel,
        reviews: tuple[Sequence[Review], Sequence[Review]],
        seed: int,
        console: Console,
    ) -> dict[str, Any]:
        """The training and held-out pairs (``[prompt, chosen, rejected]`` texts) and what labelling kept of each:
        what the task caches."""
        with on_accelerator(model):
            train, train_report = self.pairs(tokenizer, model, reward, reviews[0], seed, console)
            evaluation, eval_report = self.pairs(tokenizer, model, reward, reviews[1], seed + 1, console)
        return {
            "reward_model": reward.name,
            "train": train,
            "evaluation": evaluation,
            "labeling": train_report,
            "eval_labeling": eval_report,
        }

    def pairs(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        reward: RewardModel,
        reviews: Sequence[Review],
        seed: int,
        console: Console,
    ) -> tuple[list[list[str]], str]:
        """Sample completions of each review's prefix, score prefix + completion, keep pairs by margin; the pairs come
        back as ``[prompt, chosen, rejected]`` texts, with the labelling report's summary."""
        low, high = self.prompt_tokens
        prompts = make_prompts(reviews, tokenizer, low, high, seed)
        pad = pad_token_id(tokenizer)
        with progress(console, "IMDb labelling: completions (prompts)", len(prompts)) as done:
            samples = sample_responses(model, prompts, self.completions, pad, tokenizer.eos_token_id, seed, done)
        prompt_texts = [str(tokenizer.decode(prompt)) for prompt in prompts]
        completions = [[str(tokenizer.decode(sample, skip_special_tokens=True)) for sample in group] for group in samples]
        rewards: list[list[float]] = []
        with progress(console, f"IMDb labelling: rewards by {reward.name} (prompts)", len(prompts)) as done:
            for prompt, group in zip(prompt_texts, completions, strict=True):
                rewards.append(reward.score([prompt + text for text in group]))
                if done is not None:
                    done(len(rewards))
        pairs, report = label_pairs(prompt_texts, completions, rewards, self.margin)
        return [[pair.prompt, pair.chosen, pair.rejected] for pair in pairs], report.summary()
