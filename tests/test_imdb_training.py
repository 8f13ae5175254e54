"""The IMDb pipeline end to end on the local twin: SFT on reviews, sampled and reward-labelled pairs, methods."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SHARED_DATA, needs_shared_data
from rich.console import Console

from expo_bench.errors import RecipeError
from expo_bench.recipe import validate_recipe
from expo_bench.runner import run_experiment

ROOT = Path(__file__).parent.parent
SHARED = SHARED_DATA
pytestmark = needs_shared_data()


def twin() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "recipes" / "imdb_tiny_local.yaml").read_text())
    data["task"] |= {"source": str(SHARED / "imdb"), "tokenizer": str(SHARED / "tokenizers" / "gpt2")}
    return data


def test_imdb_twin_runs_end_to_end(tmp_path: Path) -> None:
    data = twin()
    data["task"] |= {"sft_reviews": 64, "train_prompts": 16, "eval_prompts": 8}
    data["methods"] = [{"method": "dpo", "params": {"beta": 0.1}}, {"method": "expo_compositional", "params": {"lam": 0.1}}]
    out = run_experiment(validate_recipe(data, "imdb.yaml"), tmp_path, Console(quiet=True))
    reference, *runs = json.loads((out / "summary.json").read_text())["runs"]
    # the SFT model judged against itself: the same seeded samples, so every comparison ties and KL is 0
    assert reference["method"] == "sft-reference"
    assert reference["eval"]["eval/win_rate"] == 0.5 and reference["eval"]["eval/kl"] == 0.0
    assert [run["method"] for run in runs] == ["dpo", "expo_compositional"]
    for run in runs:
        [samples] = (out / "runs").glob(f"{run['method']}-*/evaluation-*/T1/samples.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        rewards = [row["reward"] for row in rows]
        assert len(rows) == run["eval"]["eval/n"] == 2 * len({row["prompt"] for row in rows})  # 2 samples per prompt
        assert 0.0 <= run["eval"]["eval/reward"] <= 1.0 and run["eval"]["eval/reward"] == pytest.approx(sum(rewards) / len(rows))
        assert run["reward_model"] == "tfidf-logreg" and run["sft_val_nll_after"] < run["sft_val_nll_before"]
        kept = int(re.search(r"kept (\d+)", run["labeling"]).group(1))  # type: ignore[union-attr]
        assert run["train_pairs"] == kept > 0 and run["labeling"].startswith("16 prompts, 96 candidate pairs")
        assert run["steps"] > 0 and run["eval_before"]["val/rewards_accuracy"] == 0.5  # SFT model = reference: all ties
    cache = tmp_path / "imdb_tiny_local" / "cache"
    assert len(list(cache.glob("sentiment-tfidf-*.skops"))) == len(list(cache.glob("imdb-pairs-*.pt"))) == 1


def test_imdb_prompt_range_is_checked() -> None:
    data = twin()
    data["task"]["prompt_tokens"] = [8, 2]
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data, "imdb.yaml")
    [(path, message)] = caught.value.problems
    assert path == "task" and "prompt_tokens" in message


def test_a_margin_no_pair_clears_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from expo_bench.cli import main

    data = twin()
    data["task"] |= {"sft_reviews": 16, "train_prompts": 4, "eval_prompts": 2, "margin": 1.0, "evaluation": None}
    recipe = tmp_path / "imdb.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe), "--results", str(tmp_path / "results")]) == 2
    error = capsys.readouterr().err
    assert "task.margin: no train pair left from 4 prompts" in error and "lower task.margin" in error
    assert "Traceback" not in error
