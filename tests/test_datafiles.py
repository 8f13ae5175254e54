"""``expo-bench data fetch``: every file the twins read lands where they read it, IMDb rewritten as the loaders expect,
files already there kept; an unreachable hub is one clear error."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED_DATA
from rich.console import Console

from expo_bench.cli import EXIT_USER_ERROR, main
from expo_bench.datafiles import FILES, IMDB_FILES, fetch
from expo_bench.lm.imdb import load_reviews


def fake_hub(tmp_path: Path, calls: list[tuple[str, str]]) -> Any:
    """A hub that serves each file with a stand-in content: IMDb as parquet, everything else as its own name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def download(repo_id: str, filename: str, repo_type: str) -> str:
        calls.append((repo_id, filename))
        path = tmp_path / "hub" / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if filename.endswith(".parquet"):
            texts = [f"review {index} of {filename}" for index in range(3000)]
            pq.write_table(pa.table({"text": texts, "label": [index % 2 for index in range(3000)]}), path)
        else:
            path.write_text(f"{repo_id}/{filename}")
        return str(path)

    return download


def test_fetch_puts_every_file_where_the_twins_read_it(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    folder = tmp_path / "data"
    written = fetch(folder, Console(quiet=True), fake_hub(tmp_path, calls))
    expected = {file.target for file in FILES} | {"imdb/train.jsonl.xz", "imdb/test.jsonl.xz"}
    assert {str(path.relative_to(folder)) for path in written} == expected | {
        "imdb/train_sample.jsonl.gz",
        "imdb/test_sample.jsonl.gz",
    }
    assert (folder / "hh-rlhf/helpful-base/test.jsonl.gz").read_text() == "Anthropic/hh-rlhf/helpful-base/test.jsonl.gz"
    # the shipped twins' paths, relative to the data folder, are all there
    for twin, paths in {"hh": ["hh-rlhf", "tokenizers/gpt-neox-20b"], "imdb": ["imdb", "tokenizers/gpt2"]}.items():
        assert all((folder / path).exists() for path in paths), twin
    sample = load_reviews(str(folder / "imdb"), "test_sample")
    assert len(sample) == 1000 and sum(review.label for review in sample) == 500  # balanced, as the loaders' tests expect
    assert len(load_reviews(str(folder / "imdb"), "train")) == 3000
    with gzip.open(folder / "imdb/train_sample.jsonl.gz", "rt") as lines:
        assert set(json.loads(next(lines))) == {"text", "label"}
    calls.clear()
    assert fetch(folder, Console(quiet=True), fake_hub(tmp_path, calls)) == [] and calls == []  # kept, not fetched again
    assert IMDB_FILES["train"].repo == "stanfordnlp/imdb"


def test_an_unreachable_hub_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "fetch", "--to", str(tmp_path / "data")]) == EXIT_USER_ERROR  # HF_HUB_OFFLINE=1 in the tests
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot fetch harmless-base/test.jsonl.gz of the hub dataset Anthropic/hh-rlhf" in err and "Traceback" not in err


def test_the_default_folder_is_the_one_the_tests_read() -> None:
    from expo_bench.datafiles import DEFAULT_FOLDER

    assert (Path(__file__).parent.parent / DEFAULT_FOLDER).resolve() == SHARED_DATA.resolve()
