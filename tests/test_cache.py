"""The shared cache and the file primitives: whole files or none, under concurrent writers too."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from expo_bench.cache import atomic_write, cached, locked
from expo_bench.errors import UserError


def _write_entry(directory: str, start: float) -> float:
    def compute() -> dict[str, torch.Tensor]:
        time.sleep(max(0.0, start - time.time()))  # both writers publish at the same moment
        return {"value": torch.arange(2_000_000, dtype=torch.float64)}

    value, _ = cached(Path(directory), "entry", {"key": 1}, compute)
    return float(value["value"].sum())


def test_two_processes_writing_one_entry_both_get_it_whole(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        directory = tmp_path / str(attempt)
        with context.Pool(2) as pool:
            start = time.time() + 3.0
            sums = pool.starmap(_write_entry, [(str(directory), start)] * 2)
        assert sums == [float(sum(range(2_000_000)))] * 2
        assert [path.name for path in directory.iterdir() if not path.name.startswith(".")] == [
            next(directory.glob("entry-*.pt")).name
        ]
        assert not list(directory.glob("*.partial")) and not list(directory.glob(".*.partial"))
        assert cached(directory, "entry", {"key": 1}, lambda: pytest.fail("computed again"))[1]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    atomic_write(target, "old")

    def fail(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [path.name for path in tmp_path.iterdir()] == ["record.json"]


def test_a_held_lock_is_waited_for_with_a_message_then_given_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "x.lock"
    with locked(lock, "the thing"):
        started = time.monotonic()
        with (
            pytest.raises(UserError, match=r"the thing: another process held .*x\.lock for 0\.3 s"),
            locked(lock, "the thing", 0.3),
        ):
            pass
        assert 0.3 <= time.monotonic() - started < 2
    assert "waiting for the thing: another process holds" in caplog.text
    with locked(lock, "the thing", timeout=0.3):  # released: taken at once
        pass
