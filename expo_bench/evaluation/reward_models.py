"""Reward models: each scores whole texts (prompt followed by response).

Sentiment classifiers are the IMDb task's ground truth, scoring by P(positive) in [0, 1]: the DPO paper labels
pairs and evaluates with siebert/sentiment-roberta-large-english (:class:`HFSentimentClassifier`);
:class:`TfidfSentiment` is a CPU-trainable stand-in for tests and small runs, trained on the IMDb train split in
seconds, and :class:`NaiveBayesSentiment` an independent second scorer of another model family.
:class:`HFRewardModel` is a Hugging Face reward model with one output logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import torch

from expo_bench.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:  # scikit-learn and skops are imported where they are used: a recipe validates without them
    from sklearn.pipeline import Pipeline


class RewardModel(Protocol):
    """Scores texts; ``name`` goes into results' provenance."""

    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


class LabelledText(Protocol):
    """A text with a binary sentiment label (1 positive), e.g. an IMDb review."""

    @property
    def text(self) -> str: ...

    @property
    def label(self) -> int: ...


class SklearnSentiment:
    """A scikit-learn text classifier scoring by P(positive), with the file format both sentiment models share.

    Saved with skops rather than pickle/joblib: loading a skops file builds only types skops trusts (the
    scikit-learn and numpy types these pipelines use) and refuses anything else, so a crafted model file
    cannot run code. Features are hashed (2**20 buckets) rather than looked up in a fitted vocabulary:
    skops writes a 200k-term vocabulary dict entry by entry (minutes), while hashed state is numpy arrays
    (17 MB, milliseconds); on IMDb test that costs about 0.4 points of accuracy.
    """

    name = "sklearn"
    trusted: tuple[str, ...] = ()
    """scikit-learn types beyond skops' defaults that this model's file holds and loading may build."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def score(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        positive = list(self.pipeline.classes_).index(1)
        return [float(p) for p in self.pipeline.predict_proba(list(texts))[:, positive]]

    def accuracy(self, reviews: Sequence[LabelledText]) -> float:
        """Fraction of reviews whose P(positive) falls on the side of 0.5 their label says."""
        return float(self.pipeline.score([review.text for review in reviews], [review.label for review in reviews]))

    def save(self, path: Path) -> None:
        import skops.io

        skops.io.dump(self.pipeline, path)

    @classmethod
    def load(cls, path: Path) -> Self:
        """The saved pipeline; a file holding types skops does not trust by default is refused, never loaded."""
        import skops.io
        from sklearn.pipeline import Pipeline
        from skops.io.exceptions import UntrustedTypesFoundException

        try:
            pipeline = skops.io.load(path, trusted=list(cls.trusted) or None)
        except UntrustedTypesFoundException as error:
            raise DataError(f"{path}: refusing to load untrusted types ({error})") from None
        except (OSError, ValueError) as error:  # a missing file, or not a skops archive
            raise DataError(f"{path}: cannot read a skops model ({error})") from error
        if not isinstance(pipeline, Pipeline):
            raise DataError(f"{path}: expected a scikit-learn Pipeline, got {type(pipeline).__name__}")
        return cls(pipeline)


class TfidfSentiment(SklearnSentiment):
    """Hashed word uni+bigram TF-IDF features and logistic regression: 0.90 accuracy on the IMDb test split."""

    name = "tfidf-logreg"

    @classmethod
    def train(cls, reviews: Sequence[LabelledText], seed: int = 0) -> TfidfSentiment:
        """Fit on cleaned review texts; ``seed`` reaches the solver (lbfgs, the default, is deterministic anyway)."""
        from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        pipeline = make_pipeline(
            HashingVectorizer(ngram_range=(1, 2), n_features=2**20, alternate_sign=False, norm=None),
            TfidfTransformer(sublinear_tf=True),
            LogisticRegression(C=8.0, max_iter=1000, random_state=seed),
        )
        pipeline.fit([review.text for review in reviews], [review.label for review in reviews])
        return cls(pipeline)


class NaiveBayesSentiment(SklearnSentiment):
    """Another model family on other features: multinomial naive Bayes on binary character 3-5-gram presence
    (within word boundaries), a generative classifier where :class:`TfidfSentiment` is a discriminative one on words;
    its probabilities, extreme as naive Bayes' are, are calibrated by Platt scaling over 3 folds. An independent second
    judge: a policy that games one model's features is unlikely to game both. 0.82 accuracy on the IMDb test split."""

    name = "char-naive-bayes"
    trusted = ("sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration")

    @classmethod
    def train(cls, reviews: Sequence[LabelledText], seed: int = 0) -> NaiveBayesSentiment:
        """Fit on cleaned review texts (naive Bayes has no randomness; ``seed`` is accepted for a common signature)."""
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.naive_bayes import MultinomialNB
        from sklearn.pipeline import make_pipeline

        pipeline = make_pipeline(
            HashingVectorizer(
                analyzer="char_wb", ngram_range=(3, 5), n_features=2**20, alternate_sign=False, binary=True, norm=None
            ),
            CalibratedClassifierCV(MultinomialNB(alpha=1.0), method="sigmoid", cv=3),
        )
        pipeline.fit([review.text for review in reviews], [review.label for review in reviews])
        return cls(pipeline)


def positive_index(id2label: Mapping[int, str], positive_label: str | None = None) -> int:
    """The class index of the positive label: ``positive_label`` if given, else the one label containing
    "POS" (any case), else ``LABEL_1`` of two unnamed labels; ValueError when none of these decides it."""
    labels = {int(index): str(label) for index, label in id2label.items()}
    if positive_label is not None:
        matches = [index for index, label in labels.items() if label == positive_label]
    else:
        matches = [index for index, label in labels.items() if "pos" in label.lower()]
        if not matches and len(labels) == 2:
            matches = [index for index, label in labels.items() if label == "LABEL_1"]
    if len(matches) != 1:
        wanted = repr(positive_label) if positive_label is not None else "a label containing 'POS' or LABEL_1 of two"
        raise ValueError(f"cannot tell the positive class from id2label {labels}: wanted {wanted}; pass positive_label")
    return matches[0]


@torch.no_grad()
def classifier_logits(
    tokenizer: PreTrainedTokenizerBase, model: Any, texts: Sequence[str], batch_size: int, max_length: int, device: torch.device
) -> torch.Tensor:
    """A sequence classifier's float32 logits for each text, ``(texts, labels)``, in padded, truncated batches
    (the tokenizer's ``truncation_side`` decides which end an over-long text loses)."""
    logits = [torch.empty(0, model.config.num_labels)]  # so that no texts give no rows
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        logits.append(model(**batch).logits.float().cpu())
    return torch.cat(logits)


class _SequenceClassifier:
    """A Hugging Face sequence classifier and its tokenizer, scoring texts in padded, truncated batches."""

    def __init__(self, name_or_path: str, batch_size: int, max_length: int, device: str | torch.device) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        self.name = name_or_path
        self.batch_size, self.max_length, self.device = batch_size, max_length, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(self.device).eval()

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        return classifier_logits(self.tokenizer, self.model, texts, self.batch_size, self.max_length, self.device)


class HFSentimentClassifier(_SequenceClassifier):
    """A Hugging Face sequence classifier scoring by the softmax probability of its positive class."""

    def __init__(
        self,
        name_or_path: str,
        positive_label: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(name_or_path, batch_size, max_length, device)
        if self.tokenizer.pad_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has no pad token, which batched scoring needs")
        self.positive = positive_index(self.model.config.id2label, positive_label)

    def score(self, texts: Sequence[str]) -> list[float]:
        """P(positive) per text; texts longer than ``max_length`` tokens are scored on their first tokens."""
        return self.logits(texts).softmax(-1)[:, self.positive].tolist()


class HFRewardModel(_SequenceClassifier):
    """A Hugging Face sequence classifier with one output: its logit is the reward of the text."""

    def __init__(
        self, name_or_path: str, batch_size: int = 16, max_length: int = 1024, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(name_or_path, batch_size, max_length, device)
        # The judged response is at the end of the text: an over-long text loses the start of its prompt instead.
        self.tokenizer.truncation_side = "left"
        if self.model.config.num_labels != 1:
            raise ValueError(f"{name_or_path}: a reward model has one output, this one has {self.model.config.num_labels}")
        if self.tokenizer.pad_token is None:  # GPT-2 and Pythia have none; padding is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # decoder classifiers find each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, texts: Sequence[str]) -> list[float]:
        """The reward of each text; texts over ``max_length`` tokens are scored on their last tokens."""
        return self.logits(texts)[:, 0].tolist()
