"""A sweep shared out among processes: one prepares the work every run needs, workers claim runs one at a time.

A claim is a file created exclusively (``O_CREAT | O_EXCL``, atomic on a local disk and on NFS v3 and later) in a
folder fresh for each sweep, so two workers never train one run, a worker that finishes early takes the next unclaimed
run, and a run whose worker died is claimed again by the next sweep and resumed from its checkpoint."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from expo_bench.cache import atomic_write

Stage = Literal["all", "prepare", "work"]
"""``all``: everything, in one process; ``prepare``: the work the runs share (SFT, pairs, reference samples and
log-probs, the reference's evaluation) and no run; ``work``: the runs this process claims, from that shared work."""

DONE = ".done"


def slot_file(slot: str) -> str:
    """A run slot (``s0/dpo/2``) as a file name."""
    return slot.replace("/", "--")


@dataclass(frozen=True)
class Claims:
    """The claims of one sweep: ``folder`` is shared by its workers; ``worker`` names this one in its claims."""

    folder: Path
    worker: str

    def take(self, slot: str) -> bool:
        """Claim ``slot``: True for the one process that claimed it first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            handle = os.open(self.folder / slot_file(slot), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as claim:
            claim.write(f"{self.worker} pid {os.getpid()} on {socket.gethostname()}\n")
        return True

    def finish(self, slot: str) -> None:
        """Mark a claimed run finished (trained and evaluated, or recorded as diverged)."""
        atomic_write(self.folder / (slot_file(slot) + DONE), self.worker + "\n")


def finished_runs(folder: Path) -> int:
    """How many runs the workers sharing ``folder`` have finished."""
    return sum(1 for _ in folder.glob(f"*{DONE}")) if folder.is_dir() else 0


@dataclass
class SweepShare:
    """Which part of a sweep this process does (:data:`Stage`), the claims it takes runs by in stage ``work`` and how
    many runs it may take (None: until none is left; a cluster's array task takes one)."""

    stage: Stage = "all"
    claims: Claims | None = None
    max_runs: int | None = None
    taken: int = 0

    def takes(self, slot: str) -> bool:
        """Whether this process trains the run ``slot``: every run in stage ``all``, none in ``prepare``, the runs it
        claims in ``work``."""
        if self.stage != "work":
            return self.stage == "all"
        assert self.claims is not None, "a worker needs its sweep's claims"
        if self.max_runs is not None and self.taken >= self.max_runs:
            return False
        claimed = self.claims.take(slot)
        self.taken += claimed
        return claimed

    def finished(self, slot: str) -> None:
        if self.claims is not None:
            self.claims.finish(slot)
