"""Text preference pairs and the local files they come from (``.jsonl``, optionally gzip- or xz-compressed)."""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from expo_bench.errors import DataError


@dataclass(frozen=True)
class PromptPair:
    """One preference pair as text; the responses follow the prompt verbatim (HH's keep their leading space).
    ``label`` is P(chosen beats rejected): 1 for a hard label."""

    prompt: str
    chosen: str
    rejected: str
    label: float = 1.0


OPENERS: dict[str, Callable[[Path], IO[str]]] = {
    ".jsonl": lambda path: path.open(encoding="utf-8"),
    ".jsonl.gz": lambda path: gzip.open(path, "rt", encoding="utf-8"),  # noqa: SIM115
    ".jsonl.xz": lambda path: lzma.open(path, "rt", encoding="utf-8"),  # noqa: SIM115
}
"""Text-mode openers by file ending; :func:`jsonl_lines` closes what they open."""


def json_object(line: str) -> dict[str, Any]:
    """The JSON object on one line, or ValueError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object")
    return record


def jsonl_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(where, line)`` for each non-blank line of a .jsonl[.gz|.xz] file, ``where`` naming the file and 1-based line;
    a file that cannot be read is a :class:`DataError`."""
    opener = next((open_ for ending, open_ in OPENERS.items() if path.name.endswith(ending)), None)
    if opener is None:
        raise DataError(f"{path}: expected a {', '.join(OPENERS)} file")
    try:
        with opener(path) as lines:
            yield from ((f"{path}, line {number}", line) for number, line in enumerate(lines, start=1) if line.strip())
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error})") from error


def split_file(root: Path, split: str, subfolder: str | None = None, endings: Iterable[str] = OPENERS) -> Path:
    """``root`` itself if it is a file, else ``root/[subfolder/]<split><ending>`` for the first ending found there
    (default ``.jsonl[.gz|.xz]``)."""
    if root.is_file():
        return root
    folder = root / subfolder if subfolder else root
    candidates = [folder / f"{split}{ending}" for ending in endings]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise DataError(f"{root}: no split {split!r} there; looked for {', '.join(map(str, candidates))}")
    return found


def require_records(root: Path, split: str, subfolder: str | None = None) -> None:
    """DataError unless the split's file exists and holds at least one non-blank line (checked before any work)."""
    path = split_file(root, split, subfolder)
    if next(jsonl_lines(path), None) is None:
        raise DataError(f"{path}: the file is empty; expected one JSON record per line")
