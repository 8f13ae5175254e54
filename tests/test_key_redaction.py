"""A judge that echoes the API key gets it written nowhere: not in the verdict cache, the judgments, the summary, the
MLflow store or its artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_server import Scripted, serving
from rich.console import Console
from test_evaluation import SHARED, hh_twin

from expo_bench.recipe import validate_recipe
from expo_bench.runner import run_experiment

KEY = "sk-echoed-S3CRET-0123456789abcdef"


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_a_key_the_judge_echoes_is_written_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPO_BENCH_TEST_JUDGE_KEY", KEY)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land under the working directory or the results
    echo = json.dumps(f"Your Authorization header: Bearer {KEY}\nComparison: fine.\nMore helpful: A")
    with serving() as server:
        server.script = [Scripted(200, body=f'{{"choices": [{{"message": {{"content": {echo}}}}}]}}') for _ in range(200)]
        data = hh_twin(server.base_url)
        data["task"]["evaluation"]["judge"]["api_key_env"] = "EXPO_BENCH_TEST_JUDGE_KEY"
        data["task"]["sft"] = None
        run_experiment(validate_recipe(data, "hh.yaml"), tmp_path / "results", Console(quiet=True))
        assert server.requests and server.requests[0]["authorization"] == f"Bearer {KEY}"
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    judgments = [path for path in written if path.name == "judgments.jsonl"]
    assert judgments and "Bearer [API key]" in judgments[0].read_text()
    assert len(written) > 20 and not [path for path in written if KEY.encode() in path.read_bytes()]
