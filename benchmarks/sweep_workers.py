"""A sweep's wall time in one process vs shared among worker processes (``expo-bench run --workers N``), side by side.

Both run the same slice of a recipe (default: seed 0 of the tuned synthetic comparison, 74 runs) from nothing cached,
through the installed console script, one after the other on this machine; the pool's leaderboard is then compared
with the single process's (equal up to float32 sums in another thread count: the workers compute with cores/N threads).

    python benchmarks/sweep_workers.py [--workers 2] [--recipe recipes/synthetic_tokens_tuned.yaml] [--only seed=0]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(recipe: Path, only: list[str], results: Path, workers: int) -> float:
    """Wall seconds of ``expo-bench run`` of the slice into ``results``; raises when it does not finish."""
    script = shutil.which("expo-bench", path=str(Path(sys.executable).parent))
    assert script is not None, "install the package first: pip install -e ."
    command = [script, "run", str(recipe), "--results", str(results), "--yes", "--workers", str(workers)]
    for selection in only:
        command += ["--only", selection]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def largest_difference(first: Path, second: Path) -> tuple[float, int]:
    """The largest relative difference between two leaderboards' numeric cells, and how many cells were compared."""

    def cells(path: Path) -> dict[tuple[str, str], float]:
        found = {}
        with path.open() as table:
            for row in csv.DictReader(table):
                for key, value in row.items():
                    try:
                        found[row["method"], key] = float(value)
                    except ValueError:
                        continue
        return found

    a, b = cells(first), cells(second)
    assert a.keys() == b.keys(), "the two leaderboards hold different rows or columns"
    finite = [(a[key], b[key]) for key in a if math.isfinite(a[key]) and math.isfinite(b[key])]
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in finite), len(finite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "synthetic_tokens_tuned.yaml")
    parser.add_argument("--only", action="append", default=None, help="default: seed=0")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    only = args.only or ["seed=0"]
    with tempfile.TemporaryDirectory(prefix="sweep-workers-") as scratch:
        one = sweep(args.recipe, only, Path(scratch) / "one", 1)
        pool = sweep(args.recipe, only, Path(scratch) / "pool", args.workers)
        name = next(path.name for path in (Path(scratch) / "one").iterdir() if path.is_dir() and path.name != "mlartifacts")
        difference, compared = largest_difference(
            Path(scratch) / "one" / name / "leaderboard.csv", Path(scratch) / "pool" / name / "leaderboard.csv"
        )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"recipe: {args.recipe}, --only {' '.join(only)}")
    print(f"{'sweep':<22}{'wall s':>10}{'ratio':>8}")
    print(f"{'one process':<22}{one:>10.1f}{1.0:>8.2f}")
    print(f"{f'--workers {args.workers}':<22}{pool:>10.1f}{pool / one:>8.2f}")
    print(f"leaderboards: largest relative difference {difference:.1e} over {compared} numeric cells")


if __name__ == "__main__":
    main()
