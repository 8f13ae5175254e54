"""The command line: help, validate, and user mistakes as one clear message with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expo_bench.cli import EXIT_USER_ERROR, main

ROOT = Path(__file__).parent.parent


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "validate" in out


def test_validate_a_shipped_recipe(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["validate", str(ROOT / "recipes/synthetic_interpolation.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "expo_compositional" in out


def test_validate_reports_the_field_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(ROOT / "recipes/synthetic_interpolation.yaml")
    assert main(["validate", recipe, "--set", "methods.4.lam=[0.5, 2.0]"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert recipe in err and "methods[4].lam[1]" in err and "less than or equal to 1" in err


def test_user_mistake_in_a_fresh_process_has_no_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((ROOT / "recipes/synthetic_interpolation.yaml").read_text().replace("draws_per_prompt", "draws_per_promt"))
    result = subprocess.run(
        [sys.executable, "-m", "expo_bench", "run", str(recipe)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_USER_ERROR
    assert "Traceback" not in result.stderr
    assert "task.draws_per_promt" in result.stderr and "did you mean 'draws_per_prompt'" in result.stderr
    assert not (tmp_path / "results").exists()
