"""Compare a freshly generated leaderboard with the committed one: committed results must come back from their command.

    python .ci/compare_results.py FRESH_DIR COMMITTED_DIR

Reads ``leaderboard.csv`` in both folders. Every number must agree to 1e-6 (relative to its size, absolute below 1),
every other cell exactly, except the provenance columns (run ids, git sha, recipe hash), which name where a number came
from, not what it is. Exit 0 when they agree; 1 naming each cell that differs; 2 when a file is missing or unreadable.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

TOLERANCE = 1e-6
PROVENANCE = frozenset({"run_ids", "git_sha", "recipe_hash"})
LEADERBOARD = "leaderboard.csv"
ROW_KEY = ("experiment", "dataset", "method")


def read(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (folder / LEADERBOARD).open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def same(fresh: str, committed: str) -> bool:
    a, b = number(fresh), number(committed)
    if a is None or b is None:
        return fresh == committed
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))


def row_name(row: dict[str, str], index: int) -> str:
    named = [f"{key}={row[key]}" for key in ROW_KEY if row.get(key)]
    return f"row {index + 2} ({', '.join(named)})" if named else f"row {index + 2}"


def differences(fresh_dir: Path, committed_dir: Path) -> list[str]:
    """Each difference as one line naming the row and column; empty when the two leaderboards agree."""
    fresh_columns, fresh_rows = read(fresh_dir)
    committed_columns, committed_rows = read(committed_dir)
    found = []
    if fresh_columns != committed_columns:
        missing = [column for column in committed_columns if column not in fresh_columns]
        extra = [column for column in fresh_columns if column not in committed_columns]
        found.append(f"columns differ: missing {missing or 'none'}, new {extra or 'none'} (or reordered)")
    if len(fresh_rows) != len(committed_rows):
        found.append(f"{len(fresh_rows)} rows fresh, {len(committed_rows)} committed")
    compared = [column for column in committed_columns if column in fresh_columns and column not in PROVENANCE]
    for index, (fresh, committed) in enumerate(zip(fresh_rows, committed_rows, strict=False)):
        for column in compared:
            if not same(fresh[column], committed[column]):
                found.append(
                    f"{row_name(committed, index)}, column {column}: fresh {fresh[column]!r}, committed {committed[column]!r}"
                )
    return found


def main(arguments: list[str]) -> int:
    if len(arguments) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    fresh_dir, committed_dir = map(Path, arguments)
    try:
        found = differences(fresh_dir, committed_dir)
    except (OSError, csv.Error) as error:
        print(f"compare_results: cannot read a leaderboard: {error}", file=sys.stderr)
        return 2
    for line in found:
        print(f"{committed_dir / LEADERBOARD} differs from {fresh_dir / LEADERBOARD}: {line}", file=sys.stderr)
    if not found:
        print(f"{fresh_dir / LEADERBOARD} reproduces {committed_dir / LEADERBOARD} (every number to {TOLERANCE:g})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
