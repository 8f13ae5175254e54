"""Preference pairs from your own data: any local or hub table of (prompt, chosen, rejected[, label]) pairs, plain
text or conversational (TRL's, UltraFeedback's and ShareGPT's formats), with explicit splits, SFT on the chosen
responses first, and optionally AlpacaEval-style evaluation prompts with reference outputs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PrivateAttr, model_validator
from rich.console import Console

from expo_bench.config_model import ConfigModel
from expo_bench.errors import DataError
from expo_bench.lm.evaluator import HeldOutPrompts
from expo_bench.lm.preference_data import (
    FORMATS,
    MessageKeys,
    PreferenceColumns,
    extract_pairs,
    load_pairs,
    load_prompts,
    load_rows,
    local_path,
)
from expo_bench.lm.tokenize import TokenizedPair, unseen_prompts
from expo_bench.tasks.language_model import LanguageModelTask, SFTExamples, TaskData

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class PairsTask(LanguageModelTask):
    """A task whose data are preference pairs read from named splits: training pairs, held-out pairs (from their own
    split, or cut from the training split by seed), SFT on the chosen responses. A subclass reads one split."""

    max_train_pairs: int | None = Field(None, gt=0)
    max_eval_pairs: int | None = Field(None, gt=0)
    """Held-out pairs kept (validation loss and accuracy; evaluation prompts unless a test set is given)."""
    _prompt_texts: dict[tuple[int, ...], str] = PrivateAttr(default_factory=dict)
    """Prompt ids → the prompt as read (untruncated; a conversation as text), what an LLM judge is shown."""

    def remember_prompts(self, pairs: list[TokenizedPair], texts: list[str]) -> None:
        """Keep each pair's prompt as a person reads it, for the judge (:attr:`TaskData.prompt_texts`)."""
        self._prompt_texts.update((tuple(pair.prompt_ids), text) for pair, text in zip(pairs, texts, strict=True))

    @property
    def split_names(self) -> tuple[str, str | None]:
        """The training split and the held-out split (None: cut the held-out pairs from the training split)."""
        raise NotImplementedError

    def split_pairs(self, split: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[TokenizedPair], str]:
        """One split's tokenized pairs, in file order, and a line saying what was kept and dropped."""
        raise NotImplementedError

    def _pairs(self, seed: int, tokenizer: PreTrainedTokenizerBase) -> tuple[list[TokenizedPair], list[TokenizedPair], list[str]]:
        """Training and held-out pairs, no prompt in both: held-out means unseen (a policy is not scored on prompts
        it was trained on), so pairs of a prompt on both sides are dropped from the side cut from the other."""
        train_split, held_out_split = self.split_names
        train, note = self.split_pairs(train_split, tokenizer)
        notes = [f"{train_split}: {note}"]
        if held_out_split is None or held_out_split == train_split:
            train = list(train)
            random.Random(seed).shuffle(train)
            held_out = self.max_eval_pairs or max(1, len(train) // 10)
            evaluation, train = train[:held_out], train[held_out:]
            kept = unseen_prompts(train, evaluation)
            notes.append(f"{len(train) - len(kept)} training pairs dropped: their prompt is a held-out prompt")
            train = kept
        else:
            evaluation, note = self.split_pairs(held_out_split, tokenizer)
            notes.append(f"{held_out_split}: {note}")
            kept = unseen_prompts(evaluation, train)
            notes.append(f"{len(evaluation) - len(kept)} held-out pairs dropped: their prompt is a training prompt")
            evaluation = kept
        if not train or not evaluation:
            side = "training" if not train else "evaluation"
            raise DataError(f"{self.dataset}: no usable pairs left for {side} ({'; '.join(notes)})")
        return train[: self.max_train_pairs], evaluation[: self.max_eval_pairs], notes

    def sft_examples(self, seed: int, tokenizer: PreTrainedTokenizerBase, console: Console) -> SFTExamples:
        train, held_out, notes = self._pairs(seed, tokenizer)
        for note in notes:
            console.print(f"seed {seed}: {note}", highlight=False)
        return SFTExamples(train, held_out)

    def task_data(
        self,
        seed: int,
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel,
        sft: SFTExamples,
        cache_dir: Path,
        console: Console,
    ) -> TaskData:
        return TaskData(sft.train, sft.held_out, prompt_texts=dict(self._prompt_texts))


class PreferenceSplits(ConfigModel):
    """The splits of ``source`` (file stems in a local folder; any name reads a single local file)."""

    train: str = "train"
    validation: str | None = None
    """Held-out pairs: validation loss and accuracy, and the evaluation prompts unless ``test`` is set. Null (or the
    training split): shuffle the training split by seed and hold out ``max_eval_pairs`` (default a tenth)."""


class ReferencePrompts(ConfigModel):
    """Instructions and reference outputs that every policy's samples are judged against (AlpacaEval's
    ``instruction`` and ``output``), from the task's source or another one."""

    source: str | None = None
    """A local file or folder, or a hub dataset id (e.g. ``tatsu-lab/alpaca_eval``); null: the task's source."""
    name: str | None = None
    data_dir: str | None = None
    split: str = "test"
    prompt: str = "instruction"
    reference: str = "output"


class PreferenceTask(PairsTask):
    """Preference pairs from a local ``.jsonl[.gz|.xz]``/``.json``/``.parquet`` file or folder, or a hub dataset."""

    kind: Literal["preference"]
    source: str
    """A local file, a folder of ``<split>.jsonl``/``<split>.json``/``<split>.parquet`` files (``.json``: one array of
    records), or a hub dataset id."""
    name: str | None = None
    """The hub dataset's configuration."""
    data_dir: str | None = None
    splits: PreferenceSplits = PreferenceSplits()
    columns: PreferenceColumns = PreferenceColumns()
    """Default: prompt, chosen, rejected (``format: sharegpt``: conversations, chosen, rejected)."""
    format: Literal["text", "conversational", "sharegpt"] = "text"
    """``text`` (TRL's standard format): prompt and responses are strings, the responses following the prompt verbatim;
    with ``columns.prompt: null`` the prompt is the two texts' shared beginning, cut back to a word boundary.
    ``conversational``: ``{role, content}`` message lists, the response the final assistant turn, the prompt the
    turns before it in the chat template. ``sharegpt`` (LLaMA-Factory, Axolotl): the same with
    ``{from: human | gpt | system, value}`` turns, the prompt turns in ``conversations``, each response a turn or a
    list of turns."""
    messages: MessageKeys | None = None
    """How the conversations spell their turns, for data in neither convention: e.g. ``{role: speaker, content:
    text, roles: {bot: assistant}}``. Null: the format's own."""
    chat_template: str | None = None
    """A Jinja chat template over ``messages`` (with ``add_generation_prompt``) to use instead of the tokenizer's
    own: base models' tokenizers (Pythia, GPT-2, Llama-3 base) have none."""
    test: ReferencePrompts | None = None
    """Evaluation prompts with reference outputs; null: the held-out pairs' prompts and chosen responses."""
    skip_malformed: bool = False
    """Count and skip rows with a missing or mistyped column instead of stopping at the first."""
    num_proc: int | None = Field(None, ge=1)
    """Processes for ``datasets``' batched extraction and tokenization (null: this process)."""

    @model_validator(mode="before")
    @classmethod
    def _format_columns(cls, data: Any) -> Any:
        """A format's own prompt column where the recipe names none (ShareGPT's ``conversations``)."""
        columns = data.get("columns", {}) if isinstance(data, dict) else None
        if isinstance(columns, dict) and "prompt" not in columns and data.get("format") in FORMATS:
            return {**data, "columns": {"prompt": FORMATS[data["format"]].prompt_column, **columns}}
        return data

    @property
    def dataset(self) -> str:
        name = Path(self.source).stem if Path(self.source).exists() else self.source
        return "/".join(part for part in (name, self.name, self.data_dir) if part)

    @property
    def split_names(self) -> tuple[str, str | None]:
        return self.splits.train, self.splits.validation

    def load_tokenizer(self, cache_dir: Path | None = None) -> Any:
        tokenizer = super().load_tokenizer(cache_dir)
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        return tokenizer

    @model_validator(mode="after")
    def _local_source_exists(self) -> PreferenceTask:
        for source in (self.source, None if self.test is None else self.test.source):
            if source is not None and local_path(source) and not Path(source).expanduser().exists():
                raise ValueError(f"source {source!r} names a local file or folder, and there is none")
        return self

    def check_data(self) -> None:
        """Every local split read and its rows read as pairs, through the chat template (tokenizing waits for the run)."""
        if not Path(self.source).exists():
            return  # a hub dataset: read when the run starts
        tokenizer = self.load_tokenizer()
        for split in dict.fromkeys(name for name in self.split_names if name is not None):
            rows = load_rows(self.source, split, self.name, self.data_dir, self.skip_malformed)
            where = f"{self.source} ({split})"
            extract_pairs(rows, self.columns, self.format, tokenizer, where, self.skip_malformed, self.num_proc, self.messages)
        if self.test is not None and Path(self.test.source or self.source).exists():
            self.test_prompts(tokenizer)

    def split_pairs(self, split: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[TokenizedPair], str]:
        rows = load_rows(self.source, split, self.name, self.data_dir, self.skip_malformed)
        where = f"{self.source} ({split})"
        pairs, report = load_pairs(
            rows,
            self.columns,
            self.format,
            tokenizer,
            self.tokenization,
            where,
            self.skip_malformed,
            self.num_proc,
            self.messages,
        )
        self.remember_prompts(pairs, report.prompts)
        return pairs, report.summary()

    def test_prompts(self, tokenizer: PreTrainedTokenizerBase) -> HeldOutPrompts | None:
        if self.test is None:
            return None
        source = self.test.source or self.source
        rows = load_rows(source, self.test.split, self.test.name, self.test.data_dir)
        conversational = FORMATS[self.format].conversational
        where = f"{source} ({self.test.split})"
        return load_prompts(
            rows, self.test.prompt, self.test.reference, conversational, tokenizer, self.tokenization, where, self.messages
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
        test = self.test_prompts(tokenizer)
        if test is not None:
            console.print(f"seed {seed}: {len(test.prompts)} evaluation prompts with reference outputs", highlight=False)
        return TaskData(sft.train, sft.held_out, test=test, prompt_texts=dict(self._prompt_texts))
