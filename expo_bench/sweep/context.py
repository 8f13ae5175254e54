"""What every sweep is given: the validated recipe, where to cache and keep runs, and where to record them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from expo_bench.recipe import Experiment
from expo_bench.sweep.claims import SweepShare
from expo_bench.tracking import RunLog


@dataclass(frozen=True)
class SweepContext:
    experiment: Experiment
    console: Console
    cache_dir: Path
    """Shared work (SFT weights, reference samples and log-probs, judge verdicts), keyed by what it depends on."""
    runs_dir: Path
    """One directory per run: checkpoints, ``record.json``, evaluations."""
    runs: RunLog
    """The sweep's tracking-store parent run and the tags every run carries."""
    share: SweepShare = field(default_factory=SweepShare)
    """Which part of the sweep this process does: all of it, unless the sweep is shared out among workers."""
