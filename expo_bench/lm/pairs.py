"""Text preference pairs and the local files they come from (``.jsonl``, optionally gzip- or xz-compressed)."""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expo_bench.errors import DataError


@dataclass(frozen=True)
class PromptPair:
    """One preference pair as text; the responses follow the prompt verbatim (HH's keep their leading space).
    ``label`` is P(chosen beats rejected): 1 for a hard label."""

    prompt: str
    chosen: str
    rejected: str
    label: float = 1.0


OPENERS: dict[str, Callable[[Path], AbstractContextManager[Iterable[bytes]]]] = {
    ".jsonl": lambda path: path.open("rb"),
    ".jsonl.gz": lambda path: gzip.open(path, "rb"),  # noqa: SIM115
    ".jsonl.xz": lambda path: lzma.open(path, "rb"),  # noqa: SIM115
}
"""Binary openers by file ending (each line is decoded on its own, so a bad byte names its line); :func:`jsonl_lines`
closes what they open."""


def json_object(line: str) -> dict[str, Any]:
    """The JSON object on one line, or ValueError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg} at character {error.pos + 1})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object")
    return record


def jsonl_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(where, line)`` for each non-blank line of a .jsonl[.gz|.xz] file, ``where`` naming the file and 1-based line;
    a file that cannot be read is a :class:`DataError`."""
    opener = next((open_ for ending, open_ in OPENERS.items() if path.name.endswith(ending)), None)
    if opener is None:
        raise DataError(f"{path}: expected a {', '.join(OPENERS)} file")
    number = 0
    try:
        with opener(path) as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{path}, line {number}: not UTF-8 text ({error})") from None
                if line.strip():
                    yield f"{path}, line {number}", line
    except (OSError, EOFError, lzma.LZMAError) as error:
        damaged = "; a compressed file cut short?" if isinstance(error, (EOFError, lzma.LZMAError)) else ""
        raise DataError(f"{path}: cannot read past line {number} ({error}{damaged})") from None


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
