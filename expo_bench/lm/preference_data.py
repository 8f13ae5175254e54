"""Preference pairs from any table of them, through Hugging Face ``datasets``: local ``.jsonl[.gz|.xz]``, ``.json``
or ``.parquet`` files or a hub dataset, with the columns a recipe names, as plain text or as conversations.

A plain-text pair is TRL's standard format: a prompt and two responses that follow it verbatim, or (implicit prompt,
no prompt column) two texts whose shared beginning, cut back to a word boundary, is the prompt. A conversational pair
holds message lists (``[{"role": ..., "content": ...}, ...]``, UltraFeedback's and TRL's format; ShareGPT's
``{"from": "human"|"gpt", "value": ...}`` turns through a key and role map): the response is the final assistant
turn, the prompt everything before it, rendered with the tokenizer's chat template (``add_generation_prompt``); the
two sides must share that prompt. Pairs that cannot be read as a pair (:data:`DROP_REASONS`) are counted and
dropped, never repaired. An optional label column gives P(chosen beats rejected) (a soft label; 1 when absent).

Local JSON is read line by line (a fault names its line; values keep the kind JSON gives them); ``.parquet`` and hub
splits through ``datasets``. Extraction and tokenization are batched ``Dataset.map`` calls, in ``num_proc`` processes
if asked; on ``.parquet`` and hub splits they are cached on disk by ``datasets``' fingerprints, so a second seed or a
rerun tokenizes nothing again (local JSON, held in memory, is tokenized again: seconds for 10⁵ pairs).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from expo_bench.config_model import ConfigModel
from expo_bench.errors import DataError
from expo_bench.lm.evaluator import HeldOutPrompts
from expo_bench.lm.pairs import PromptPair, json_object, jsonl_lines, split_file
from expo_bench.lm.tokenize import TRUNCATE_PROMPT, TokenizationConfig, TokenizedPair, tokenize_texts, truncate_pair

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

LOCAL_BUILDERS = {".jsonl": "json", ".jsonl.gz": "json", ".jsonl.xz": "json", ".json": "json", ".parquet": "parquet"}
"""File ending → the ``datasets`` builder that reads it."""

ASSISTANT = "assistant"
PROMPT_ROLES = ("user", "system")
"""Roles whose turns are a prompt's, never a response's."""
Renderer = Callable[[list[dict[str, str]]], str]
"""Messages → the prompt text a model continues."""
MALFORMED = "malformed"
MIXED_KINDS = "_expo_bench_mixed_kinds"
"""A column added to local JSON rows read with ``skip_malformed``: why a row's cell was of another kind than its
column's (None: it was not)."""
DROP_REASONS = {
    "identical_responses": "the chosen and rejected responses are the same text",
    "prompt_mismatch": "the two sides' prompts differ (in a conversation, the turns before the last answer)",
    "no_final_assistant_turn": "a side does not end with an assistant turn; map the data's role names in messages.roles",
    "no_shared_prompt": "implicit prompt: the two texts share no beginning up to a word boundary",
    MALFORMED: "a missing or mistyped column, or a label outside [0, 1] (skipped with skip_malformed: true)",
}
"""Why a row is dropped → what that means (the README lists them)."""


class MessageKeys(ConfigModel):
    """How a conversation spells its turns: the key of the speaker and of the text, and the data's speaker names."""

    role: str = "role"
    content: str = "content"
    roles: dict[str, str] = Field(default_factory=dict)
    """The data's speaker names → the chat template's (``user``, ``assistant``, ``system``); others are kept as
    written."""


SHAREGPT = MessageKeys(role="from", content="value", roles={"human": "user", "gpt": "assistant", "system": "system"})
"""ShareGPT's turns (LLaMA-Factory, Axolotl): ``{"from": "human" | "gpt" | "system", "value": ...}``."""


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
    """What loading one split kept and dropped, by reason, and the prompt of each kept pair as a person reads it."""

    total: int
    dropped: Counter[str]
    prompts: list[str] = field(default_factory=list)
    """A text prompt as written; a conversation as ``User: ...`` paragraphs (what an LLM judge is shown)."""
    repeated_prompts: int = 0
    """Kept pairs whose responses began with the prompt column's prompt, read once."""

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())

    def summary(self) -> str:
        dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items())) or "none"
        repeated = f"; {self.repeated_prompts} repeated the prompt at the start of both responses (read once)"
        return f"{self.total} pairs: kept {self.kept}, dropped {dropped}" + (repeated if self.repeated_prompts else "")


def load_rows(
    source: str, split: str, name: str | None = None, data_dir: str | None = None, skip_malformed: bool = False
) -> datasets.Dataset:
    """One split's rows: from a local file (any split name reads it) or a folder of ``<split>.<ending>`` files, else
    from the hub dataset ``source`` (``name`` its configuration, ``data_dir`` its subfolder). Local JSON is read by
    :func:`json_rows`, which names the line of any fault."""
    import datasets

    local = Path(source)
    if local_path(source) and not local.exists():
        raise DataError(f"{source}: no such file or folder")
    try:
        if local.exists():
            path = split_file(local, split, data_dir, LOCAL_BUILDERS)
            builder = next((b for ending, b in LOCAL_BUILDERS.items() if path.name.endswith(ending)), None)
            if builder is None:
                raise DataError(f"{path}: expected a {', '.join(LOCAL_BUILDERS)} file")
            if builder == "json":
                return json_rows(path, skip_malformed)
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(source, name=name, data_dir=data_dir, split=split)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
        where = source if not local.exists() else str(local)
        hint = "" if local.exists() else " (not a local file or folder, so read as a hub dataset id)"
        raise DataError(f"{where}{hint}: cannot load split {split!r}: {error}") from None


def local_path(source: str) -> bool:
    """Whether ``source`` can only mean a local path (a file ending or a path prefix), never a hub dataset id."""
    return source.startswith(("/", "./", "../", "~")) or any(source.endswith(ending) for ending in LOCAL_BUILDERS)


def json_rows(path: Path, skip_malformed: bool = False) -> datasets.Dataset:
    """The records of a ``.jsonl[.gz|.xz]`` file (one object per line) or a ``.json`` array, read as JSON says: a
    text ``"null"`` stays text and a label ``"0.5"`` stays a string (``datasets``' JSON reader coerces both). A
    damaged file or an invalid line is a :class:`DataError` naming the line; so is a column holding different kinds of
    value, unless ``skip_malformed`` (then such a row is malformed, its fault in :data:`MIXED_KINDS`)."""
    import datasets
    import pyarrow

    records = _json_array(path) if path.name.endswith(".json") else _jsonl_records(path)
    if not records:
        raise DataError(f"{path}: the file holds no records; expected one JSON object per line (.json: an array of them)")
    try:
        return datasets.Dataset.from_list([record for _, record in records])
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        mixed = _mixed_columns(records)
        if not mixed or not skip_malformed:
            first = next(iter(mixed.values()), None)
            raise DataError(first.message if first else f"{path}: cannot make a table of its records ({error})") from None
    kept = []
    for where, record in records:
        fault = mixed.get(where)
        cleared = {column: None if fault and fault.column == column else value for column, value in record.items()}
        kept.append(cleared | {MIXED_KINDS: fault.message if fault else None})
    return datasets.Dataset.from_list(kept)


def _jsonl_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for where, line in jsonl_lines(path):
        try:
            records.append((where, json_object(line)))
        except ValueError as error:
            raise DataError(f"{where}: {error}") from None
    return records


def _json_array(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = path.read_bytes()
        array = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if not isinstance(array, list) or not all(isinstance(record, dict) for record in array):
        raise DataError(f"{path}: expected a JSON array of objects, found {found(array)}")
    return [(f"{path}, record {number}", record) for number, record in enumerate(array, start=1)]


def _kind(value: Any) -> str:
    """A JSON value's kind: what a column holds throughout."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


@dataclass(frozen=True)
class _Fault:
    column: str
    message: str


def _mixed_columns(records: list[tuple[str, dict[str, Any]]]) -> dict[str, _Fault]:
    """Each record (by where it is) holding a value of another kind than its column's first (text where numbers
    were, ...), and what is wrong."""
    first: dict[str, tuple[str, str]] = {}
    faults = {}
    for where, record in records:
        for column, value in record.items():
            if value is None:
                continue
            kind = _kind(value)
            seen_where, seen_kind = first.setdefault(column, (where, kind))
            if kind != seen_kind and where not in faults:
                faults[where] = _Fault(
                    column,
                    f"{where}: column {column!r} holds {kind} ({json.dumps(value)[:60]}) where {seen_where} holds "
                    f"{seen_kind}; a column holds one kind of value",
                )
    return faults


def found(value: Any) -> str:
    """What a cell holds, for an error message: ``a list of 2 objects with keys 'from', 'value'``, ``a str``."""
    if value is None:
        return "missing"
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(repr, value)) or '(none)'}"
    if isinstance(value, list):
        kinds = list(dict.fromkeys(found(item).removeprefix("an ").removeprefix("a ") for item in value))
        items = f"{len(value)} item{'s' if len(value) != 1 else ''}"
        return f"a list of {items}" + (f": {'; '.join(kinds)}" if kinds else "")
    return f"a {type(value).__name__}"


def _format_hint(value: Any) -> str:
    """The format whose turns a cell looks like, when it is not the recipe's."""
    turns = value if isinstance(value, list) else [value]
    keys = {key for turn in turns if isinstance(turn, dict) for key in turn}
    if {SHAREGPT.role, SHAREGPT.content} <= keys:
        return " (ShareGPT-style turns: format: sharegpt)"
    if {"role", "content"} <= keys:
        return " (message lists: format: conversational)"
    return ""


def _messages(value: Any, what: str, keys: MessageKeys) -> list[dict[str, str]]:
    """A message list (a text counts as one user turn, an object as one message), or ValueError saying what was
    found instead."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not all(
        isinstance(m, dict) and isinstance(m.get(keys.role), str) and isinstance(m.get(keys.content), str) for m in turns
    ):
        hint = "" if keys.role != "role" else _format_hint(value)
        raise ValueError(f"{what} is {found(value)}, not a list of {{{keys.role}, {keys.content}}} messages{hint}")
    return [{"role": keys.roles.get(m[keys.role], m[keys.role]), "content": m[keys.content]} for m in turns]


def readable(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as a person (or an LLM judge) reads it: one ``Role: text`` paragraph per turn."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _label(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"label {value!r} is not a probability in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class ReadPair(PromptPair):
    """A pair read from a conversation: its prompt rendered for the model, and ``shown`` as a person reads it."""

    shown: str = ""
    prompt_repeated: bool = False
    """Both responses began with the prompt column's text or turns (``ultrafeedback_binarized``'s shape), read once."""


def _shared_prompt(chosen: str, rejected: str) -> PromptPair | str:
    """An implicit prompt: the texts' common beginning, cut back to before its last whitespace so that no response
    starts mid-word (a character-level prefix would cut into ``" yes"``/``" yet"``)."""
    common = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), min(len(chosen), len(rejected)))
    cut = max((index for index in range(common) if chosen[index].isspace()), default=0)
    if cut == 0:
        return "no_shared_prompt"
    return PromptPair(chosen[:cut], chosen[cut:], rejected[cut:])


def _text_pair(row: dict[str, Any], columns: PreferenceColumns, keys: MessageKeys, render: Renderer | None) -> PromptPair | str:
    named = [column for column in (columns.prompt, columns.chosen, columns.rejected) if column is not None]
    texts = {column: row.get(column) for column in named}
    for column, value in texts.items():
        if not isinstance(value, str):
            raise ValueError(f"column {column!r} is {found(value)}, not text{_format_hint(value)}")
    *prompt, chosen, rejected = (str(value) for value in texts.values())
    if chosen == rejected:
        return "identical_responses"
    if not prompt:
        return _shared_prompt(chosen, rejected)
    repeated = bool(prompt[0]) and chosen.startswith(prompt[0]) and rejected.startswith(prompt[0])
    if repeated:  # TRL's explicit-prompt format holds completions only: this prompt would be read twice
        chosen, rejected = chosen[len(prompt[0]) :], rejected[len(prompt[0]) :]
    return ReadPair(prompt[0], chosen, rejected, shown=prompt[0], prompt_repeated=repeated)


def _conversation_pair(
    row: dict[str, Any], columns: PreferenceColumns, keys: MessageKeys, render: Renderer | None
) -> PromptPair | str:
    assert render is not None
    before = [] if columns.prompt is None else _messages(row.get(columns.prompt), f"column {columns.prompt!r}", keys)
    answers = [_messages(row.get(column), f"column {column!r}", keys) for column in (columns.chosen, columns.rejected)]
    repeated = bool(before) and all(answer[: len(before)] == before for answer in answers)
    if repeated:  # the messages hold the whole conversation and the prompt column repeats its start: read it once
        before = []
    elif before and (opening := next((a[0] for a in answers if a and a[0]["role"] in PROMPT_ROLES), None)):
        raise ValueError(
            f"column {columns.chosen!r} or {columns.rejected!r} opens with a {opening['role']} turn that is not the "
            f"prompt in column {columns.prompt!r}, so the prompt would be read twice: where the messages hold the "
            "whole conversation, set columns.prompt: null"
        )
    sides = [before + answer for answer in answers]
    last = next((side[-1]["role"] if side else "none" for side in sides if not side or side[-1]["role"] != ASSISTANT), None)
    if last is not None:
        return f"no_final_assistant_turn (the last turn's role is {last!r})"
    (*context, chosen), (*rejected_context, rejected) = sides
    if context != rejected_context:
        return "prompt_mismatch"
    if chosen["content"] == rejected["content"]:
        return "identical_responses"
    return ReadPair(render(context), chosen["content"], rejected["content"], shown=readable(context), prompt_repeated=repeated)


@dataclass(frozen=True)
class PairFormat:
    """How a row holds a pair: the reader, whether it is a conversation (rendered with the chat template), how its
    turns are spelled, and the prompt column a recipe that names none reads."""

    extract: Callable[[dict[str, Any], PreferenceColumns, MessageKeys, Renderer | None], PromptPair | str]
    conversational: bool
    messages: MessageKeys
    prompt_column: str | None = "prompt"


FORMATS = {
    "text": PairFormat(_text_pair, conversational=False, messages=MessageKeys()),
    "conversational": PairFormat(_conversation_pair, conversational=True, messages=MessageKeys()),
    "sharegpt": PairFormat(_conversation_pair, conversational=True, messages=SHAREGPT, prompt_column="conversations"),
}
"""A recipe's ``format`` → how its rows are read."""


def chat_renderer(tokenizer: PreTrainedTokenizerBase) -> Renderer:
    """Messages → the prompt text the model continues: the chat template with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, which conversational data needs: "
            "set task.chat_template (a Jinja template over messages, e.g. the one in recipes/ultrafeedback_tiny_local.yaml)"
        )
    import jinja2

    def render(messages: list[dict[str, str]]) -> str:
        try:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except jinja2.TemplateSyntaxError as error:
            raise DataError(f"the chat template (task.chat_template or the tokenizer's) is not valid Jinja: {error}") from None
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template refused this conversation: {error}") from None

    return render


def _extract(
    batch: dict[str, list[Any]],
    indices: list[int],
    columns: PreferenceColumns,
    format: str,
    keys: MessageKeys,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, list[Any]]:
    """Batched: each row's prompt, responses and label as text, or why it was dropped (``dropped``, else "")."""
    reader = FORMATS[format]
    render = chat_renderer(tokenizer) if reader.conversational else None
    out: dict[str, list[Any]] = {name: [] for name in ("prompt", "chosen", "rejected", "label", "dropped", "shown", "repeated")}
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    for index, row in zip(indices, rows, strict=True):
        try:
            if row.get(MIXED_KINDS):
                raise ValueError(row[MIXED_KINDS])
            read = reader.extract(row, columns, keys, render)
            label = 1.0 if columns.label is None else _label(row.get(columns.label))
        except ValueError as error:
            read, label = f"{MALFORMED} (row {index + 1}: {error})", 1.0
        pair, dropped = (PromptPair("", "", ""), read) if isinstance(read, str) else (read, "")
        out["prompt"].append(pair.prompt)
        out["chosen"].append(pair.chosen)
        out["rejected"].append(pair.rejected)
        out["label"].append(label)
        out["dropped"].append(dropped)
        out["shown"].append(pair.shown if isinstance(pair, ReadPair) else pair.prompt)
        out["repeated"].append(isinstance(pair, ReadPair) and pair.prompt_repeated)
    return out


def _tokenize(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, config: TokenizationConfig
) -> dict[str, list[Any]]:
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


def extract_pairs(
    rows: datasets.Dataset,
    columns: PreferenceColumns,
    format: str,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    skip_malformed: bool = False,
    num_proc: int | None = None,
    messages: MessageKeys | None = None,
) -> datasets.Dataset:
    """Each row's pair as text (``prompt``, ``chosen``, ``rejected``, ``label``, ``shown``, ``repeated``) or why it is
    dropped (``dropped``). A missing column, a malformed row unless ``skip_malformed``, or rows of which none is a
    usable pair are a :class:`DataError`."""
    named = [column for column in (columns.prompt, columns.chosen, columns.rejected, columns.label) if column is not None]
    missing = [column for column in named if column not in rows.column_names]
    if missing:
        sharegpt = format != "sharegpt" and FORMATS["sharegpt"].prompt_column in rows.column_names
        hint = " (ShareGPT-style data: format: sharegpt)" if sharegpt else ""
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))}; its columns: {', '.join(rows.column_names)}{hint}")
    extracted = rows.map(
        _extract,
        batched=True,
        with_indices=True,
        fn_kwargs={"columns": columns, "format": format, "keys": messages or FORMATS[format].messages, "tokenizer": tokenizer},
        remove_columns=rows.column_names,
        num_proc=num_proc,
    )
    first_malformed = next((reason for reason in extracted["dropped"] if reason.startswith(MALFORMED)), None)
    if first_malformed is not None and not skip_malformed:
        raise DataError(
            f"{where}: {first_malformed.removeprefix(MALFORMED + ' (').removesuffix(')')} (skip_malformed: true skips such rows)"
        )
    drops = [reason for reason in extracted["dropped"] if reason]
    if len(drops) == len(rows):
        raise DataError(f"{where}: no usable pairs left of {len(rows)} rows, dropped:{_drop_examples(drops)}")
    return extracted


def load_pairs(
    rows: datasets.Dataset,
    columns: PreferenceColumns,
    format: str,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizationConfig,
    where: str,
    skip_malformed: bool = False,
    num_proc: int | None = None,
    messages: MessageKeys | None = None,
) -> tuple[list[TokenizedPair], LoadReport]:
    """A split's rows as tokenized pairs, and what was kept and dropped. A malformed row (a missing or mistyped
    column, a label outside [0, 1]) is a :class:`DataError` naming ``where`` and the row, unless ``skip_malformed``;
    so is a split of which no pair is left, with the count and a first example of each reason. ``messages``: how the
    conversations spell their turns (default: the format's own)."""
    extracted = extract_pairs(rows, columns, format, tokenizer, where, skip_malformed, num_proc, messages)
    drops = [reason for reason in extracted["dropped"] if reason]
    kept = extracted.filter(lambda dropped: not dropped, input_columns="dropped", num_proc=num_proc)
    tokenized = kept.map(_tokenize, batched=True, fn_kwargs={"tokenizer": tokenizer, "config": config}, num_proc=num_proc)
    reasons = Counter(reason.split(" (", 1)[0] for reason in drops)
    return _as_pairs(tokenized), LoadReport(len(rows), reasons, kept["shown"], sum(kept["repeated"]))


def _drop_examples(drops: list[str]) -> str:
    """One line per reason: its count, what it means and the first row's detail."""
    firsts: dict[str, str] = {}
    for drop in drops:
        reason, _, detail = drop.partition(" (")
        firsts.setdefault(reason, detail.removesuffix(")"))
    counts = Counter(drop.partition(" (")[0] for drop in drops)
    return "".join(
        f"\n  {counts[reason]} {reason}: {DROP_REASONS.get(reason, reason)}" + (f" (first: {detail})" if detail else "")
        for reason, detail in firsts.items()
    )


def load_prompts(
    rows: datasets.Dataset,
    prompt_column: str,
    reference_column: str,
    conversational: bool,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizationConfig,
    where: str,
    messages: MessageKeys | None = None,
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
            turns = _messages(prompt, f"column {prompt_column!r}", messages or MessageKeys()) if render is not None else None
        except ValueError as error:
            raise DataError(f"{where}, row {index + 1}: {error}") from None
        prompts.append(prompt if render is None or turns is None else render(turns))
        shown.append(prompt if isinstance(prompt, str) else readable(turns or []))
        references.append(reference)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    reference_ids = tokenizer(references, add_special_tokens=False)["input_ids"] if references else []
    truncate = TRUNCATE_PROMPT[config.prompt_truncation]
    prompt_ids = [truncate(list(ids), config.max_prompt_length) for ids in prompt_ids]
    return HeldOutPrompts(prompt_ids, shown, [list(ids) for ids in reference_ids])
