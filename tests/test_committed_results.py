"""Committed results must regenerate from a commit: each committed summary names a clean commit of this history, a run
refuses to write into a committed results folder from uncommitted code, and CI's comparison of a fresh leaderboard with
the committed one fails on an edited number."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from expo_bench.cli import EXIT_USER_ERROR, main
from expo_bench.errors import UserError
from expo_bench.runner import committed_files, refuse_dirty_overwrite

ROOT = Path(__file__).parent.parent
COMPARE = ROOT / ".ci" / "compare_results.py"


def git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def committed_summaries() -> list[str]:
    found = git("ls-files", "--", "results/**/summary.json", "results/*/summary.json").stdout.split()
    return sorted(set(found))


@pytest.mark.parametrize("summary", committed_summaries())
def test_each_committed_summary_names_a_clean_commit_of_this_history(summary: str) -> None:
    sha = json.loads((ROOT / summary).read_text())["git_sha"]
    assert not sha.endswith("-dirty"), f"{summary}: written from uncommitted code ({sha})"
    assert git("merge-base", "--is-ancestor", sha, "HEAD").returncode == 0, f"{summary}: {sha} is not an ancestor of HEAD"


def test_there_are_committed_summaries_to_check() -> None:
    assert {"results/synthetic_tokens_tuned/summary.json", "results/synthetic_tokens_tuned/first_pass/summary.json"} <= set(
        committed_summaries()
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout with one committed results folder."""
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "results" / "quickstart").mkdir(parents=True)
    (tmp_path / "results" / "quickstart" / "summary.json").write_text("{}\n")
    git("add", ".", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results", cwd=tmp_path)
    return tmp_path


def test_dirty_code_may_not_overwrite_committed_results(checkout: Path) -> None:
    committed = checkout / "results" / "quickstart"
    assert committed_files(committed) == ["summary.json"]
    with pytest.raises(UserError, match=r"holds committed results .*uncommitted changes \(abc-dirty\).*--allow-dirty"):
        refuse_dirty_overwrite(committed, "abc-dirty", allow_dirty=False)
    refuse_dirty_overwrite(committed, "abc-dirty", allow_dirty=True)  # told to
    refuse_dirty_overwrite(committed, "abc", allow_dirty=False)  # clean code
    refuse_dirty_overwrite(checkout / "results" / "new", "abc-dirty", allow_dirty=False)  # nothing committed there
    assert committed_files(checkout.parent / "not-a-checkout") == []


def test_run_refuses_before_writing_anything(
    checkout: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import expo_bench.runner

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(expo_bench.runner, "git_revision", lambda where: "abc-dirty")
    results = checkout / "results"
    before = sorted(path.relative_to(results) for path in results.rglob("*"))
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--results", str(results)]) == EXIT_USER_ERROR
    err = " ".join(capsys.readouterr().err.split())
    assert f"{results / 'quickstart'} holds committed results (1 tracked file, e.g. summary.json)" in err
    assert "Traceback" not in err and sorted(path.relative_to(results) for path in results.rglob("*")) == before


COMMITTED_LEADERBOARD = ROOT / "results" / "synthetic_tokens_tuned" / "leaderboard.csv"


def compare(fresh: Path, committed: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(COMPARE), str(fresh), str(committed)], capture_output=True, text=True)


def edited(folder: Path, row: int, column: str, value: str) -> None:
    path = folder / "leaderboard.csv"
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[row + 1][rows[0].index(column)] = value
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.fixture
def leaderboards(tmp_path: Path) -> tuple[Path, Path]:
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    for folder in (fresh, committed):
        folder.mkdir()
        shutil.copy(COMMITTED_LEADERBOARD, folder / "leaderboard.csv")
    return fresh, committed


def test_compare_results_passes_on_identical_numbers_and_other_provenance(leaderboards: tuple[Path, Path]) -> None:
    fresh, committed = leaderboards
    edited(fresh, 0, "run_ids", "another run")
    edited(fresh, 0, "git_sha", "0" * 40)
    value = float(next(csv.DictReader(COMMITTED_LEADERBOARD.open()))["eval/kl_target_to_policy"])
    edited(fresh, 0, "eval/kl_target_to_policy", repr(value * (1 + 1e-9)))  # below the tolerance
    found = compare(fresh, committed)
    assert found.returncode == 0, found.stderr
    assert "reproduces" in found.stdout


def test_compare_results_fails_naming_an_edited_committed_number(leaderboards: tuple[Path, Path]) -> None:
    fresh, committed = leaderboards
    rows = list(csv.DictReader(COMMITTED_LEADERBOARD.open()))
    value = float(rows[1]["eval/kl_target_to_policy"])
    edited(committed, 1, "eval/kl_target_to_policy", repr(round(value + 1e-4, 6)))
    found = compare(fresh, committed)
    assert found.returncode == 1
    assert f"row 3 (experiment=synthetic_tokens_tuned, dataset=synthetic_tokens, method={rows[1]['method']})" in found.stderr
    assert "column eval/kl_target_to_policy: fresh" in found.stderr and found.stderr.count("\n") == 1


def test_compare_results_fails_on_a_missing_row_or_column_and_a_missing_file(leaderboards: tuple[Path, Path]) -> None:
    fresh, committed = leaderboards
    lines = (committed / "leaderboard.csv").read_text().splitlines(keepends=True)
    (fresh / "leaderboard.csv").write_text("".join(lines[:-1]))
    found = compare(fresh, committed)
    assert found.returncode == 1 and f"{len(lines) - 2} rows fresh, {len(lines) - 1} committed" in found.stderr
    (fresh / "leaderboard.csv").write_text("".join(line.split(",", 1)[1] for line in lines))
    assert "columns differ: missing ['method']" in compare(fresh, committed).stderr
    assert compare(fresh / "nowhere", committed).returncode == 2
