"""Anthropic HH-RLHF preference pairs, split into (prompt, chosen, rejected) at the last assistant turn.

Both sides of a record are full dialogues. The prompt is the text before the LAST ``"\\n\\nAssistant:"``
and must be identical on both sides; a character-level common prefix instead cuts into the responses
whenever they start alike (DESIGN §4). Pairs that do not split cleanly are dropped and counted, never
silently repaired.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expo_bench.errors import DataError
from expo_bench.lm.pairs import PromptPair, json_object, jsonl_lines, split_file

ASSISTANT = "\n\nAssistant:"
HUB_ID = "Anthropic/hh-rlhf"
FIELDS = ("chosen", "rejected")


def split_hh(chosen: str, rejected: str) -> PromptPair | str:
    """The pair split at each side's last assistant turn, or why it cannot be used as a pair."""
    if ASSISTANT not in chosen or ASSISTANT not in rejected:
        return "no_assistant_turn"
    prompt, _, chosen_response = chosen.rpartition(ASSISTANT)
    rejected_prompt, _, rejected_response = rejected.rpartition(ASSISTANT)
    if prompt != rejected_prompt:
        return "prompt_mismatch"
    if chosen_response == rejected_response:
        return "identical_responses"
    return PromptPair(prompt + ASSISTANT, chosen_response, rejected_response)


@dataclass
class HHSplitReport:
    """What loading kept and dropped: ``total`` counts well-formed records; ``malformed`` skipped lines."""

    total: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    malformed: int = 0

    def summary(self) -> str:
        dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items())) or "none"
        return f"{self.total} pairs: kept {self.kept}, dropped {dropped}; {self.malformed} malformed lines skipped"


def _check_record(line: str) -> dict[str, str]:
    """The record of one line, or ValueError saying what is wrong with it."""
    record = json_object(line)
    for name in FIELDS:
        if not isinstance(record.get(name), str):
            raise ValueError(f"{name!r} is {'missing' if name not in record else type(record[name]).__name__}")
    return {name: record[name] for name in FIELDS}


def read_jsonl(path: Path, skip_malformed: bool, report: HHSplitReport) -> Iterator[dict[str, str]]:
    """Records with string ``chosen``/``rejected`` from a .jsonl[.gz|.xz] file.

    A malformed line is a :class:`DataError` naming the file and 1-based line, or, with ``skip_malformed``,
    counted in ``report.malformed``. Blank lines (e.g. a trailing empty line) carry no record and are skipped.
    """
    for where, line in jsonl_lines(path):
        try:
            record = _check_record(line)
        except ValueError as error:
            if not skip_malformed:
                expected = "a JSON object with string fields 'chosen' and 'rejected'"
                raise DataError(f"{where}: expected {expected}, got {error}") from None
            report.malformed += 1
            continue
        yield record


def _hub_records(data_dir: str | None, split: str) -> Iterable[dict[str, Any]]:
    """The hub dataset's rows; ``datasets`` is imported here because only this path needs it."""
    import datasets

    return datasets.load_dataset(HUB_ID, data_dir=data_dir, split=split)


def load_hh_pairs(
    source: str, data_dir: str | None, split: str, skip_malformed: bool = False
) -> tuple[list[PromptPair], HHSplitReport]:
    """Pairs from a local file or folder (e.g. ``shared/data/hh-rlhf``, ``helpful-base``, ``test``) or the hub.

    ``source`` is a local path if one exists, else it must be the hub id ``Anthropic/hh-rlhf``.
    """
    report = HHSplitReport()
    local = Path(source)
    if local.exists():
        records: Iterable[dict[str, Any]] = read_jsonl(split_file(local, split, data_dir), skip_malformed, report)
    elif source == HUB_ID:
        records = _hub_records(data_dir, split)
    else:
        raise DataError(f"{source}: no such file or folder, and not the hub dataset id {HUB_ID!r}")
    pairs = []
    for record in records:
        report.total += 1
        result = split_hh(record["chosen"], record["rejected"])
        if isinstance(result, str):
            report.dropped[result] += 1
        else:
            pairs.append(result)
    report.kept = len(pairs)
    return pairs, report
