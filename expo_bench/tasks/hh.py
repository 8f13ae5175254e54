"""Anthropic HH (the DPO paper's dialogue task): pairs split at the last assistant turn, SFT on the chosen responses
("Preferred-FT", the DPO paper's reference). A preference-pairs task whose split is read by HH's own reader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from expo_bench.config_model import LocalOrHub
from expo_bench.errors import DataError
from expo_bench.lm.hh import HUB_ID, load_hh_pairs
from expo_bench.lm.pairs import require_records
from expo_bench.lm.preference_data import tokenize_pairs
from expo_bench.lm.tokenize import TokenizedPair
from expo_bench.tasks.preference import PairsTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class HHTask(PairsTask):
    """HH pairs from the hub (``source: Anthropic/hh-rlhf``) or a local file or folder.

    When ``eval_split`` equals ``train_split`` (local test splits), the pairs are shuffled once by seed
    and cut into training and held-out slices. Either way no held-out prompt is a training prompt: the pairs that
    would share one are dropped from training (one split) or from the held-out pairs (two splits), and counted.
    """

    kind: Literal["hh"]
    tokenizer: LocalOrHub = "EleutherAI/pythia-2.8b"
    source: str = HUB_ID
    data_dir: str | None = "helpful-base"
    train_split: str = "train"
    eval_split: str = "test"
    skip_malformed: bool = False

    @model_validator(mode="after")
    def _source_exists(self) -> HHTask:
        if self.source != HUB_ID and not Path(self.source).exists():
            raise ValueError(f"source {self.source!r} is neither an existing file or folder nor the hub id {HUB_ID!r}")
        if self.source != HUB_ID:
            for split in dict.fromkeys((self.train_split, self.eval_split)):
                try:
                    require_records(Path(self.source), split, self.data_dir)
                except DataError as error:
                    raise ValueError(str(error)) from None
        return self

    @property
    def dataset(self) -> str:
        return "hh-rlhf" if self.data_dir is None else f"hh-rlhf/{self.data_dir}"

    @property
    def split_names(self) -> tuple[str, str | None]:
        return self.train_split, self.eval_split

    def split_pairs(self, split: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[TokenizedPair], str]:
        pairs, report = load_hh_pairs(self.source, self.data_dir, split, self.skip_malformed)
        tokenized = tokenize_pairs(pairs, tokenizer, self.tokenization)
        self.remember_prompts(tokenized, [pair.prompt for pair in pairs])  # the judge reads the dialogue untruncated
        return tokenized, report.summary()
