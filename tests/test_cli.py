"""The command line: help, validate, and user mistakes as one clear message with exit status 2."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


SHARED = ROOT.parent / "shared" / "data"


def hh_recipe(tmp_path: Path, name: str, **task: object) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "hh_tiny_local.yaml").read_text())
    data["task"] |= {"source": str(SHARED / "hh-rlhf"), "tokenizer": str(SHARED / "tokenizers" / "gpt-neox-20b"), **task}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: the command line, and what its one message must say."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes((ROOT / "recipes" / "quickstart.yaml").read_bytes().replace(b"quickstart", b"caf\xe9"))
    empty_hh = tmp_path / "hh-empty" / "helpful-base"
    empty_hh.mkdir(parents=True)
    (empty_hh / "test.jsonl").write_text("")
    empty_imdb = tmp_path / "imdb-empty"
    empty_imdb.mkdir()
    (empty_imdb / "train.jsonl").write_text('{"text": "fine", "label": 1}\n')
    (empty_imdb / "test.jsonl").write_text("\n\n")
    imdb = yaml.safe_load((ROOT / "recipes" / "imdb_tiny_local.yaml").read_text())
    imdb["task"] |= {
        "source": str(empty_imdb),
        "tokenizer": str(SHARED / "tokenizers" / "gpt2"),
        "train_split": "train",
        "eval_split": "test",
    }
    (tmp_path / "imdb.yaml").write_text(yaml.safe_dump(imdb))
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    return {
        "non-UTF-8 recipe": ([str(latin1)], "not UTF-8 text: byte 0xe9"),
        "--set value not YAML": ([quickstart, "--set", "train.max_epochs=[1"], "train.max_epochs: value '[1' is not valid YAML"),
        "missing tokenizer folder": (
            [str(hh_recipe(tmp_path, "no-tokenizer", tokenizer=str(tmp_path / "tokenizers" / "pythia")))],
            "task.tokenizer: Value error, no such file or folder",
        ),
        "optimizer kwarg typo": (
            [quickstart, "--set", "train.optimizer.kwargs={betass: [0.9, 0.99]}"],
            "train.optimizer.kwargs.betass: unknown key 'betass' for torch.optim.AdamW (did you mean 'betas'?)",
        ),
        "empty HH file": (
            [str(hh_recipe(tmp_path, "empty-hh", source=str(tmp_path / "hh-empty")))],
            "test.jsonl: the file is empty",
        ),
        "empty IMDb file": ([str(tmp_path / "imdb.yaml")], "test.jsonl: the file is empty"),
        "lr .inf": ([quickstart, "--set", "train.optimizer.lr=.inf"], "train.optimizer.lr: Input should be a finite number"),
        "typo in model.tiny": (
            [str(hh_recipe(tmp_path, "hh")), "--set", "task.model.tiny.num_hiden_layers=2"],
            "task.model.tiny.num_hiden_layers: unknown key 'num_hiden_layers' for gpt_neox",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["non-UTF-8 recipe", "--set value not YAML", "missing tokenizer folder", "optimizer kwarg typo", "empty HH file",
     "empty IMDb file", "lr .inf", "typo in model.tiny"],
)  # fmt: skip
def test_each_bad_input_exits_2_with_one_message_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    arguments, expected = bad_inputs(tmp_path)[case]
    results = tmp_path / "results"
    assert main(["run", arguments[0], "--results", str(results), *arguments[1:]]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()) and "Traceback" not in err
    assert not results.exists()


def test_a_corrupt_or_locked_store_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from expo_bench import tracking

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = tmp_path / "results"
    results.mkdir()
    store = results / "mlflow.db"
    store.write_bytes(b"this is not a database, just some bytes" * 100)
    before = snapshot(results)
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    assert main(["run", recipe, "--results", str(results)]) == EXIT_USER_ERROR
    assert "cannot be read as an SQLite database (file is not a database)" in " ".join(capsys.readouterr().err.split())
    assert snapshot(results) == before

    store.unlink()
    sqlite3.connect(store).execute("CREATE TABLE t (x)").connection.commit()
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a long write
    before = snapshot(results)
    monkeypatch.setattr(tracking, "STORE_WAIT_S", 0.5)
    try:
        assert main(["run", recipe, "--results", str(results)]) == EXIT_USER_ERROR
    finally:
        holder.close()
    assert "stayed locked by another process for 0.5 s" in " ".join(capsys.readouterr().err.split())
    assert "waiting for the tracking store" in caplog.text
    assert snapshot(results) == before


def test_a_read_only_results_folder_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import expo_bench.cli

    monkeypatch.setenv("COLUMNS", "300")
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: the folder refuses as a read-only one would

        def refused(dir: Path) -> None:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))

        monkeypatch.setattr(expo_bench.cli.tempfile, "TemporaryFile", refused)
    try:
        assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--results", str(results)]) == EXIT_USER_ERROR
    finally:
        results.chmod(0o755)
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot write results under {results / 'quickstart'}: {results}: Permission denied" in err
    assert "Traceback" not in err and not list(results.iterdir())
