"""Preference pairs from any table of them, through Hugging Face ``datasets``: local ``.jsonl[.gz|.xz]`` or
``.parquet`` files or a hub dataset, with the columns a recipe names, as plain text or as conversations.

A conversational pair holds message lists (``[{"role": ..., "content": ...}, ...]``, UltraFeedback's and TRL's
format): the response is the final assistant turn, the prompt everything before it, rendered with the tokenizer's
chat template (``add_generation_prompt``); the two sides must share that prompt. Pairs whose prompts differ or
whose responses are identical are counted and dropped, never repaired. An optional label column gives
P(chosen beats rejected) (a soft label; 1 when absent).

Extraction and tokenization are batched ``Dataset.map`` calls, in ``num_proc`` processes if asked, cached on disk
by ``datasets``' fingerprints (of the data files, the function and its arguments, the tokenizer included), so a
second seed or a rerun reads and tokenizes nothing again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expo_bench.config_model import ConfigModel
from expo_bench.errors import DataError
from expo_bench.lm.evaluation import HeldOutPrompts
from expo_bench.lm.pairs import PromptPair, split_file
from expo_bench.lm.tokenize import TRUNCATE_PROMPT, TokenizationConfig, TokenizedPair, tokenize_texts, truncate_pair

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

LOCAL_BUILDERS = {".jsonl": "json", ".jsonl.gz": "json", ".jsonl.xz": "json", ".json": "json", ".parquet": "parquet"}
"""File ending → the ``datasets`` builder that reads it."""

ASSISTANT = "assistant"
Renderer = Callable[[list[dict[str, str]]], str]
"""Messages → the prompt text a model continues."""
MALFORMED = "malformed"


class PreferenceColumns(ConfigModel):
    """Which column holds what. ``prompt`` may be null for conversations whose message lists carry the prompt."""

    prompt: str | None = "prompt"
    """Text (or, in a conversation, a message list or a text taken as one user turn) put before both responses."""
    chosen: str = "chosen"
    rejected: str = "rejected"
    label: str | None = None
    """P(chosen beats rejected) in [0, 1] per pair (soft labels); null: every label is 1."""


@dataclass
class LoadReport:
    """What loading one split kept and dropped, by reason."""

    total: int
    dropped: Counter[str]

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())

    def summary(self) -> str:
        dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items())) or "none"
        return f"{self.total} pairs: kept {self.kept}, dropped {dropped}"


def load_rows(source: str, split: str, name: str | None = None, data_dir: str | None = None) -> datasets.Dataset:
    """One split's rows: from a local file (any split name reads it) or a folder of ``<split>.<ending>`` files, else
    from the hub dataset ``source`` (``name`` its configuration, ``data_dir`` its subfolder)."""
    import datasets

    local = Path(source)
    try:
        if local.exists():
            path = split_file(local, split, data_dir, LOCAL_BUILDERS)
            builder = next((b for ending, b in LOCAL_BUILDERS.items() if path.name.endswith(ending)), None)
            if builder is None:
                raise DataError(f"{path}: expected a {', '.join(LOCAL_BUILDERS)} file")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(source, name=name, data_dir=data_dir, split=split)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
        where = source if not local.exists() else str(local)
        hint = "" if local.exists() else " (not a local file or folder, so read as a hub dataset id)"
        raise DataError(f"{where}{hint}: cannot load split {split!r}: {error}") from None


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    """A message list (a text counts as one user turn), or ValueError saying what is wrong with it."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise ValueError(f"{what} is not a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _label(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"label {value!r} is not a probability in [0, 1]")
    return float(value)


def _text_pair(row: dict[str, Any], columns: PreferenceColumns, render: Renderer | None) -> PromptPair | str:
    if columns.prompt is None:
        raise ValueError("plain-text pairs need a prompt column (columns.prompt)")
    texts = {column: row.get(column) for column in (columns.prompt, columns.chosen, columns.rejected)}
    for column, value in texts.items():
        if not isinstance(value, str):
            raise ValueError(f"column {column!r} is {'missing' if value is None else type(value).__name__}, not text")
    prompt, chosen, rejected = (str(value) for value in texts.values())
    if chosen == rejected:
        return "identical_responses"
    return PromptPair(prompt, chosen, rejected)


def _conversation_pair(row: dict[str, Any], columns: PreferenceColumns, render: Renderer | None) -> PromptPair | str:
    assert render is not None
    before = [] if columns.prompt is None else _messages(row.get(columns.prompt), f"column {columns.prompt!r}")
    sides = [before + _messages(row.get(column), f"column {column!r}") for column in (columns.chosen, columns.rejected)]
    if any(not side or side[-1]["role"] != ASSISTANT for side in sides):
        return "no_final_assistant_turn"
    (*context, chosen), (*rejected_context, rejected) = sides
    if context != rejected_context:
        return "prompt_mismatch"
    if chosen["content"] == rejected["content"]:
        return "identical_responses"
    return PromptPair(render(context), chosen["content"], rejected["content"])


EXTRACTORS = {"text": _text_pair, "conversational": _conversation_pair}
"""A pair's format → how its prompt and responses are read from a row."""


def chat_renderer(tokenizer: PreTrainedTokenizerBase) -> Renderer:
    """Messages → the prompt text the model continues: the chat template with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, which conversational data needs: "
            "set task.chat_template (a Jinja template over messages, e.g. the one in recipes/ultrafeedback_tiny_local.yaml)"
        )
    return lambda messages: str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _extract(
    batch: dict[str, list[Any]], indices: list[int], columns: PreferenceColumns, format: str, tokenizer: Any
) -> dict[str, list[Any]]:
    """Batched: each row's prompt, responses and label as text, or why it was dropped (``dropped``, else "")."""
    render = chat_renderer(tokenizer) if format == "conversational" else None
    out: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": [], "label": [], "dropped": []}
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    for index, row in zip(indices, rows, strict=True):
        try:
            found = EXTRACTORS[format](row, columns, render)
            label = 1.0 if columns.label is None else _label(row.get(columns.label))
        except ValueError as error:
            found, label = f"{MALFORMED} (row {index + 1}: {error})", 1.0
        pair, dropped = (PromptPair("", "", ""), found) if isinstance(found, str) else (found, "")
        out["prompt"].append(pair.prompt)
        out["chosen"].append(pair.chosen)
        out["rejected"].append(pair.rejected)
        out["label"].append(label)
        out["dropped"].append(dropped)
    return out


def _tokenize(batch: dict[str, list[Any]], tokenizer: Any, config: TokenizationConfig) -> dict[str, list[Any]]:
    """Batched :func:`~expo_bench.lm.tokenize.tokenize_pair`: one tokenizer call per column, EOS after each response."""
    ids = tokenize_texts(tokenizer, batch["prompt"], batch["chosen"], batch["rejected"], config)
    pairs = [truncate_pair(*texts, config, label) for texts, label in zip(ids, batch["label"], strict=True)]
    return {
        "prompt_ids": [pair.prompt_ids for pair in pairs],
        "chosen_ids": [pair.chosen_ids for pair in pairs],
        "rejected_ids": [pair.rejected_ids for pair in pairs],
        "prompt_truncated": [pair.prompt_truncated for pair in pairs],
        "response_truncated": [pair.response_truncated for pair in pairs],
    }


def _as_pairs(tokenized: datasets.Dataset) -> list[TokenizedPair]:
    columns = ("prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated", "response_truncated", "label")
    return [TokenizedPair(*row) for row in zip(*(tokenized[column] for column in columns), strict=True)]


def tokenize_pairs(
    pairs: Sequence[PromptPair], tokenizer: PreTrainedTokenizerBase, config: TokenizationConfig, num_proc: int | None = None
) -> list[TokenizedPair]:
    """Text pairs tokenized in batches (the same ids as :func:`~expo_bench.lm.tokenize.tokenize_pair`, pair by pair)."""
    import datasets

    if not pairs:
        return []
    table = datasets.Dataset.from_dict(
        {field: [getattr(pair, field) for pair in pairs] for field in ("prompt", "chosen", "rejected", "label")}
    )
    return _as_pairs(table.map(_tokenize, batched=True, fn_kwargs={"tokenizer": tokenizer, "config": config}, num_proc=num_proc))


def load_pairs(
    rows: datasets.Dataset,
    columns: PreferenceColumns,
    format: str,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizationConfig,
    where: str,
    skip_malformed: bool = False,
    num_proc: int | None = None,
) -> tuple[list[TokenizedPair], LoadReport]:
    """A split's rows as tokenized pairs, and what was kept and dropped. A malformed row (a missing or mistyped
    column, a label outside [0, 1]) is a :class:`DataError` naming ``where`` and the row, unless ``skip_malformed``."""
    named = [column for column in (columns.prompt, columns.chosen, columns.rejected, columns.label) if column is not None]
    missing = [column for column in named if column not in rows.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))}; its columns: {', '.join(rows.column_names)}")
    extracted = rows.map(
        _extract,
        batched=True,
        with_indices=True,
        fn_kwargs={"columns": columns, "format": format, "tokenizer": tokenizer},
        remove_columns=rows.column_names,
        num_proc=num_proc,
    )
    reasons = Counter(reason.split(" (", 1)[0] for reason in extracted["dropped"] if reason)
    first_malformed = next((reason for reason in extracted["dropped"] if reason.startswith(MALFORMED)), None)
    if first_malformed is not None and not skip_malformed:
        raise DataError(
            f"{where}: {first_malformed.removeprefix(MALFORMED + ' (').removesuffix(')')} (skip_malformed: true skips such rows)"
        )
    kept = extracted.filter(lambda dropped: not dropped, input_columns="dropped", num_proc=num_proc)
    tokenized = kept.map(_tokenize, batched=True, fn_kwargs={"tokenizer": tokenizer, "config": config}, num_proc=num_proc)
    return _as_pairs(tokenized), LoadReport(len(rows), reasons)


def load_prompts(
    rows: datasets.Dataset,
    prompt_column: str,
    reference_column: str,
    conversational: bool,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizationConfig,
    where: str,
) -> HeldOutPrompts:
    """Evaluation prompts with the reference output each policy sample is judged against (AlpacaEval's
    ``instruction``/``output``). In a conversational task a text prompt is one user turn, rendered with the chat
    template; the judge sees the prompt as the dataset wrote it."""
    missing = [column for column in (prompt_column, reference_column) if column not in rows.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))}; its columns: {', '.join(rows.column_names)}")
    render = chat_renderer(tokenizer) if conversational else None
    prompts, references, shown = [], [], []
    for index, (prompt, reference) in enumerate(zip(rows[prompt_column], rows[reference_column], strict=True)):
        if not isinstance(reference, str) or (not conversational and not isinstance(prompt, str)):
            raise DataError(f"{where}, row {index + 1}: expected text in {prompt_column!r} and {reference_column!r}")
        try:
            messages = _messages(prompt, f"column {prompt_column!r}") if render is not None else None
        except ValueError as error:
            raise DataError(f"{where}, row {index + 1}: {error}") from None
        prompts.append(prompt if render is None or messages is None else render(messages))
        shown.append(prompt if isinstance(prompt, str) else "\n\n".join(f"{m['role']}: {m['content']}" for m in messages or []))
        references.append(reference)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    reference_ids = tokenizer(references, add_special_tokens=False)["input_ids"] if references else []
    truncate = TRUNCATE_PROMPT[config.prompt_truncation]
    prompt_ids = [truncate(list(ids), config.max_prompt_length) for ids in prompt_ids]
    return HeldOutPrompts(prompt_ids, shown, [list(ids) for ids in reference_ids])
