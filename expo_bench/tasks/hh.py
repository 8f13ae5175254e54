"""Anthropic HH (the DPO paper's dialogue task): pairs split at the last assistant turn, SFT on the chosen responses
("Preferred-FT", the DPO paper's reference)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from rich.console import Console
from transformers import PreTrainedModel

from expo_bench.config_model import LocalOrHub
from expo_bench.errors import DataError
from expo_bench.lm.hh import HUB_ID, load_hh_pairs
from expo_bench.lm.pairs import PromptPair, require_records
from expo_bench.lm.tokenize import tokenize_pair
from expo_bench.tasks.language_model import LanguageModelTask, SFTExamples, TaskData


class HHTask(LanguageModelTask):
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
    max_train_pairs: int | None = Field(None, gt=0)
    max_eval_pairs: int | None = Field(None, gt=0)
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

    def _pairs(self, seed: int) -> tuple[list[PromptPair], list[PromptPair], list[str]]:
        train, train_report = load_hh_pairs(self.source, self.data_dir, self.train_split, self.skip_malformed)
        notes = [f"{self.train_split}: {train_report.summary()}"]
        if self.eval_split == self.train_split:
            random.Random(seed).shuffle(train)
            held_out = self.max_eval_pairs or max(1, len(train) // 10)
            evaluation, train = train[:held_out], train[held_out:]
            seen = {pair.prompt for pair in evaluation}
            kept = [pair for pair in train if pair.prompt not in seen]
            notes.append(f"{len(train) - len(kept)} training pairs dropped: their prompt is a held-out prompt")
            train = kept
        else:
            evaluation, eval_report = load_hh_pairs(self.source, self.data_dir, self.eval_split, self.skip_malformed)
            notes.append(f"{self.eval_split}: {eval_report.summary()}")
            seen = {pair.prompt for pair in train}
            kept = [pair for pair in evaluation if pair.prompt not in seen]
            notes.append(f"{len(evaluation) - len(kept)} held-out pairs dropped: their prompt is a training prompt")
            evaluation = kept
        if not train or not evaluation:
            raise DataError(
                f"{self.source}: no usable pairs left for {'training' if not train else 'evaluation'} ({'; '.join(notes)})"
            )
        return train[: self.max_train_pairs], evaluation[: self.max_eval_pairs], notes

    def sft_examples(self, seed: int, tokenizer: Any, console: Console) -> SFTExamples:
        train_pairs, eval_pairs, notes = self._pairs(seed)
        for note in notes:
            console.print(f"seed {seed}: {note}")
        return SFTExamples(
            [tokenize_pair(tokenizer, pair, self.tokenization) for pair in train_pairs],
            [tokenize_pair(tokenizer, pair, self.tokenization) for pair in eval_pairs],
        )

    def task_data(
        self, seed: int, tokenizer: Any, reference: PreTrainedModel, sft: SFTExamples, cache_dir: Path, console: Console
    ) -> TaskData:
        return TaskData(sft.train, sft.held_out)
