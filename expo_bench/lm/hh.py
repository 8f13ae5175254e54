"""Anthropic HH-RLHF preference pairs, split into (prompt, chosen, rejected) at the last assistant turn.

Both sides of a record are full dialogues. The prompt is the text before the LAST ``"\\n\\nAssistant:"``
and must be identical on both sides; a character-level common prefix instead cuts into the responses
whenever they start alike (DESIGN §4). Pairs that do not split cleanly are dropped and counted, never
silently repaired.
"""

from __future__ import annotations

import gzip
import json
import lzma
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from expo_bench.errors import UserError

ASSISTANT = "\n\nAssistant:"
HUB_ID = "Anthropic/hh-rlhf"
FIELDS = ("chosen", "rejected")

# Text-mode openers by file ending; read_jsonl closes what they open.
_OPENERS: dict[str, Callable[[Path], IO[str]]] = {
    ".jsonl": lambda path: path.open(encoding="utf-8"),
    ".jsonl.gz": lambda path: gzip.open(path, "rt", encoding="utf-8"),  # noqa: SIM115
    ".jsonl.xz": lambda path: lzma.open(path, "rt", encoding="utf-8"),  # noqa: SIM115
}


class DataError(UserError):
    """A data file or source that cannot be read as preference pairs; the message names it."""


@dataclass(frozen=True)
class PromptPair:
    """One preference pair: ``prompt`` ends with ``"\\n\\nAssistant:"``; responses keep their leading space."""

    prompt: str
    chosen: str
    rejected: str


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


def json_object(line: str) -> dict[str, Any]:
    """The JSON object on one line, or ValueError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object")
    return record


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
    opener = next((open_ for ending, open_ in _OPENERS.items() if path.name.endswith(ending)), None)
    if opener is None:
        raise DataError(f"{path}: expected a {', '.join(_OPENERS)} file")
    try:
        with opener(path) as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = _check_record(line)
                except ValueError as error:
                    if not skip_malformed:
                        raise DataError(
                            f"{path}, line {number}: expected a JSON object with string fields "
                            f"'chosen' and 'rejected', got {error}"
                        ) from None
                    report.malformed += 1
                    continue
                yield record
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error})") from error


def _local_file(root: Path, data_dir: str | None, split: str) -> Path:
    """``root`` itself if it is a file, else ``root/<data_dir>/<split>.jsonl[.gz|.xz]``."""
    if root.is_file():
        return root
    folder = root / data_dir if data_dir else root
    candidates = [folder / f"{split}{ending}" for ending in _OPENERS]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise DataError(f"{root}: no split {split!r} there; looked for {', '.join(map(str, candidates))}")
    return found


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
        records: Iterable[dict[str, Any]] = read_jsonl(_local_file(local, data_dir, split), skip_malformed, report)
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
