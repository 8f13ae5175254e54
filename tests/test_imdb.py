"""IMDb controlled-sentiment data (cleaning, loading, prompts, pair labeling) and the sentiment reward models."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import skops.io
from conftest import SHARED_DATA, missing
from sklearn.linear_model import LogisticRegression

from expo_bench.errors import DataError
from expo_bench.evaluation.reward_models import HFSentimentClassifier, RewardModel, TfidfSentiment, positive_index
from expo_bench.lm.imdb import Review, clean_review, label_pairs, load_reviews, make_prompts
from expo_bench.lm.pairs import PromptPair

DATA = SHARED_DATA
IMDB = DATA / "imdb"
GPT2 = DATA / "tokenizers" / "gpt2"


@pytest.fixture(scope="module")
def imdb() -> Path:
    if not IMDB.is_dir():
        pytest.skip(missing(IMDB))
    return IMDB


@pytest.fixture(scope="module")
def test_sample(imdb: Path) -> list[Review]:
    return load_reviews(str(imdb), "test_sample")


@pytest.fixture(scope="module")
def train(imdb: Path) -> list[Review]:
    return load_reviews(str(imdb), "train")


@pytest.fixture(scope="module")
def tfidf(train: list[Review]) -> TfidfSentiment:
    return TfidfSentiment.train(train, seed=0)


def gpt2_tokenizer() -> Any:
    if not GPT2.is_dir():
        pytest.skip(missing(GPT2))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return gpt2_tokenizer()


# --- cleaning and loading ----------------------------------------------------------------------------------


def test_clean_review_strips_markup_and_unescapes() -> None:
    raw = "Great!<br /><br />A <i>real</i> gem &amp; Ond&#345;ej  <BR>rules. <3 it, <=8 &lt;b&gt;\n"
    assert clean_review(raw) == "Great! A real gem & Ondřej rules. <3 it, <=8 <b>"


def test_real_reviews_come_back_clean(imdb: Path, test_sample: list[Review], train: list[Review]) -> None:
    with gzip.open(imdb / "test_sample.jsonl.gz", "rt", encoding="utf-8") as lines:
        raw = [json.loads(line)["text"] for line in lines]
    assert sum("<br" in text for text in raw) == 602
    assert not any("<br" in review.text or "  " in review.text for review in test_sample)
    assert not any(re.search(r"&#\d+;", review.text) for review in train)
    by_id = {review.id: review.text for review in train}
    assert "Ondřej" in by_id["train/pos/3786_9"] and "Altıoklar" in by_id["train/neg/10789_3"]


def test_local_splits_have_documented_counts(imdb: Path, test_sample: list[Review], train: list[Review]) -> None:
    assert len(test_sample) == 1000 and Counter(review.label for review in test_sample) == {0: 500, 1: 500}
    assert test_sample[0].id == "test/neg/21_1" and len({review.id for review in test_sample}) == 1000
    assert len(train) == 25000 and Counter(review.label for review in train) == {0: 12500, 1: 12500}
    sample_file = load_reviews(str(imdb / "train_sample.jsonl.gz"), "ignored when the source is a file")
    assert Counter(review.label for review in sample_file) == {0: 1000, 1: 1000}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "a list, not an object"),
        ('{"label": 1}', "'text' is missing"),
        ('{"text": "ok", "label": 2}', "'label' is 2"),
        ('{"text": "ok", "label": true}', "'label' is True"),
        ('{"text": "ok", "label": 0, "id": 7}', "'id' is int"),
    ],
)
def test_malformed_line_names_file_line_and_expectation(tmp_path: Path, line: str, complaint: str) -> None:
    path = tmp_path / "dev.jsonl"
    path.write_text(f'{{"id": "a", "text": "fine", "label": 1}}\n\n{line}\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_reviews(str(tmp_path), "dev")
    expected = f"{path}, line 3: expected a JSON object with string 'text', 'label' 0 or 1 and, if present, string 'id', got "
    assert str(caught.value).startswith(expected + complaint)


def test_skip_malformed_counts_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl.gz"
    lines = ['{"text": "a <br />b", "label": 0}', "{bad", '{"text": "c", "label": 1}', '{"text": 1, "label": 1}', ""]
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("\n".join(lines))
    with pytest.warns(UserWarning, match="skipped 2 malformed records"):
        reviews = load_reviews(str(path), "dev", skip_malformed=True)
    assert reviews == [Review("dev/0", "a b", 0), Review("dev/2", "c", 1)]


def test_missing_split_and_unknown_source_are_errors(imdb: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no split 'validation' there; looked for .*validation\.jsonl, "):
        load_reviews(str(imdb), "validation")
    with pytest.raises(DataError, match="not the hub dataset id 'stanfordnlp/imdb'"):
        load_reviews(str(tmp_path / "nowhere"), "test")
    (tmp_path / "reviews.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a \.jsonl, \.jsonl\.gz, \.jsonl\.xz file"):
        load_reviews(str(tmp_path / "reviews.csv"), "test")


def test_hub_rows_get_split_index_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    rows = [{"text": "Fun.<br />Really", "label": 1}, {"text": "unlabeled", "label": -1}]
    requested: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> list[dict[str, Any]]:
        requested.append((name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)  # no local folder named like the hub id
    with pytest.raises(DataError, match=r"^stanfordnlp/imdb split 'unsupervised', row 1: expected .* got 'label' is -1$"):
        load_reviews("stanfordnlp/imdb", "unsupervised")
    with pytest.warns(UserWarning, match="skipped 1 malformed records"):
        assert load_reviews("stanfordnlp/imdb", "test", skip_malformed=True) == [Review("test/0", "Fun. Really", 1)]
    assert requested == [("stanfordnlp/imdb", "unsupervised"), ("stanfordnlp/imdb", "test")]


# --- prompts -----------------------------------------------------------------------------------------------


def test_prompts_are_seeded_review_prefixes(test_sample: list[Review], tokenizer: Any) -> None:
    prompts = make_prompts(test_sample, tokenizer, seed=0)
    assert set(Counter(map(len, prompts))) == set(range(2, 9))
    assert make_prompts(test_sample, tokenizer, seed=0) == prompts
    assert make_prompts(test_sample, tokenizer, seed=1) != prompts
    for review, ids in zip(test_sample, prompts, strict=True):
        assert review.text.startswith(tokenizer.decode(ids))
    full = tokenizer("Great", add_special_tokens=False)["input_ids"]
    assert make_prompts([Review("x", "Great", 1)], tokenizer, min_tokens=4, max_tokens=4) == [full]
    with pytest.raises(ValueError, match="min_tokens <= max_tokens"):
        make_prompts(test_sample, tokenizer, min_tokens=5, max_tokens=4)


# --- pair labeling -----------------------------------------------------------------------------------------


def test_label_pairs_keeps_pairs_a_margin_apart_higher_reward_chosen() -> None:
    prompts = ["The film", "I"]
    completions = [[" was dull", " was great", " was fine", " was great"], [" loved it", " hated it"]]
    rewards = [[0.25, 0.75, 0.625, 0.875], [0.5, 0.25]]
    pairs, report = label_pairs(prompts, completions, rewards, margin=0.25)
    assert pairs == [
        PromptPair("The film", " was great", " was dull"),
        PromptPair("The film", " was fine", " was dull"),
        PromptPair("The film", " was great", " was dull"),
        PromptPair("The film", " was great", " was fine"),
        PromptPair("I", " loved it", " hated it"),
    ]
    assert (report.prompts, report.candidate_pairs, report.kept_pairs, report.identical_pairs) == (2, 7, 5, 1)
    assert report.summary() == "2 prompts, 7 candidate pairs: kept 5, dropped 1 identical and 1 with reward gap below 0.25"
    # Two gaps sit exactly on the margin (0.875 - 0.625, 0.5 - 0.25): kept at 0.25, dropped just above it.
    assert len(label_pairs(prompts, completions, rewards, margin=0.2500001)[0]) == 3


def test_label_pairs_rejects_bad_shapes_and_margins() -> None:
    with pytest.raises(ValueError, match="margin must be positive"):
        label_pairs(["p"], [["a", "b"]], [[0.0, 1.0]], margin=0.0)
    with pytest.raises(ValueError, match="1 prompts, 2 completion lists, 1 reward lists"):
        label_pairs(["p"], [["a"], ["b"]], [[0.0]], margin=0.1)
    with pytest.raises(ValueError, match="prompt 0: 2 completions but 1 rewards"):
        label_pairs(["p"], [["a", "b"]], [[0.0]], margin=0.1)


# --- reward models -----------------------------------------------------------------------------------------


def test_tfidf_sentiment_accuracy_and_round_trip(tfidf: TfidfSentiment, test_sample: list[Review], tmp_path: Path) -> None:
    model: RewardModel = tfidf
    assert tfidf.accuracy(test_sample) >= 0.91  # measured 0.921 (trained on all 25,000 train reviews)
    texts = [review.text for review in test_sample]
    scores = model.score(texts)
    assert all(0.0 <= score <= 1.0 for score in scores) and model.score([]) == []
    assert model.score(["A wonderful, moving film."])[0] > 0.5 > model.score(["Dull, awful and a waste of time."])[0]
    tfidf.save(tmp_path / "tfidf.skops")
    assert TfidfSentiment.load(tmp_path / "tfidf.skops").score(texts) == scores


class Payload:
    """Stands in for an arbitrary class a crafted model file could ask to build."""


def test_tfidf_load_refuses_untrusted_and_foreign_files(tmp_path: Path) -> None:
    skops.io.dump(Payload(), tmp_path / "payload.skops")
    with pytest.raises(DataError, match="refusing to load untrusted types"):
        TfidfSentiment.load(tmp_path / "payload.skops")
    skops.io.dump(LogisticRegression(), tmp_path / "bare.skops")
    with pytest.raises(DataError, match="expected a scikit-learn Pipeline, got LogisticRegression"):
        TfidfSentiment.load(tmp_path / "bare.skops")
    with pytest.raises(DataError, match="cannot read a skops model"):
        TfidfSentiment.load(tmp_path / "missing.skops")


def test_positive_index_from_labels() -> None:
    assert positive_index({0: "NEGATIVE", 1: "POSITIVE"}) == 1
    assert positive_index({0: "positive", 1: "negative"}) == 0
    assert positive_index({0: "LABEL_0", 1: "LABEL_1"}) == 1
    assert positive_index({0: "bad", 1: "good"}, positive_label="good") == 1
    with pytest.raises(ValueError, match="cannot tell the positive class"):
        positive_index({0: "bad", 1: "good"})
    with pytest.raises(ValueError, match="wanted 'great'"):
        positive_index({0: "NEGATIVE", 1: "POSITIVE"}, positive_label="great")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized 2-layer GPT-2 classifier saved like a hub checkpoint, its tokenizer padding with EOS."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-sentiment")
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hf_classifier_scores_positive_probabilities(tiny_classifier: Path, test_sample: list[Review]) -> None:
    texts = [review.text for review in test_sample[:6]] + ["Fine.", "Not good at all, sadly."]
    classifier = HFSentimentClassifier(str(tiny_classifier), batch_size=3, max_length=48)
    model: RewardModel = classifier
    assert model.name == str(tiny_classifier) and classifier.positive == 1
    batched = model.score(texts)
    assert len(batched) == len(texts) and all(0.0 < score < 1.0 for score in batched)
    assert batched == pytest.approx([model.score([text])[0] for text in texts], abs=1e-5)
    negative = HFSentimentClassifier(str(tiny_classifier), positive_label="NEGATIVE", batch_size=8, max_length=48)
    assert negative.score(texts) == pytest.approx([1.0 - score for score in batched], abs=1e-5)
