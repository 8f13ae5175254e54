"""Every real-scale recipe rehearsed as shipped (tests/rehearsal.py swaps only what this machine lacks) and run end to
end by the installed console script: SFT, reference work, every method, evaluation at every temperature, the
leaderboard, one MLflow run per policy. Multi-device recipes run on 2 CPU ranks over gloo."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from chat_server import serving
from conftest import needs_shared_data
from rehearsal import ROOT, STAND_IN_KEY, load, real_scale, rehearsal, shipped_recipes, tiny_classifier, unswapped

from expo_bench import tracking
from expo_bench.recipe import validate_recipe

pytestmark = needs_shared_data()

REAL_SCALE = [path for path in shipped_recipes() if real_scale(load(path))]
HEADLINE = ROOT / "recipes" / "hh_pythia28.yaml"
SLOW = {
    "ultrafeedback_llama3_8b": "2 CPU ranks, 5 methods, an LLM judge: about 3 minutes",
    "imdb_gpt2_large": "17 runs and a classifier: about 3 minutes",
}
"""Rehearsals beyond the headline's, deselected by default (``pytest -m slow`` runs them)."""


def test_the_real_scale_recipes_are_found() -> None:
    assert {path.name for path in REAL_SCALE} >= {"hh_pythia28.yaml", "ultrafeedback_llama3_8b.yaml", "imdb_gpt2_large.yaml"}
    assert set(SLOW) | {HEADLINE.stem} == {path.stem for path in REAL_SCALE}


@pytest.mark.parametrize("path", REAL_SCALE, ids=lambda path: path.stem)
def test_a_rehearsal_changes_only_what_this_machine_lacks(path: Path, tmp_path: Path) -> None:
    recipe = load(path)
    rehearsed = rehearsal(recipe, "http://127.0.0.1:1/v1", tmp_path)
    assert unswapped(recipe, rehearsed) == []
    for field in ("strategy", "precision", "optimizer", "gradient_clip_val", "accumulate_grad_batches", "deterministic"):
        assert rehearsed["train"].get(field) == recipe["train"].get(field), field
    assert [entry.get("params") for entry in rehearsed["methods"]] == [entry.get("params") for entry in recipe["methods"]]


def test_a_setting_added_to_a_recipe_is_rehearsed() -> None:
    recipe = load(HEADLINE)
    recipe["train"]["group_by_length"] = 4
    recipe["task"]["evaluation"]["temperatures"] = [0.3]
    rehearsed = rehearsal(recipe, "http://127.0.0.1:1/v1")
    assert rehearsed["train"]["group_by_length"] == 4 and rehearsed["task"]["evaluation"]["temperatures"] == [0.3]
    tampered = rehearsal(recipe, "http://127.0.0.1:1/v1")
    tampered["train"]["strategy"] = "ddp"  # a change outside the swaps is reported
    assert unswapped(recipe, tampered) == ["train.strategy"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("classifier"))


def rehearse(path: Path, workdir: Path, classifier: Path) -> tuple[dict[str, Any], Path, str]:
    """Run ``path``'s rehearsal with the installed console script; its recipe, its results folder and its output."""
    script = shutil.which("expo-bench", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no expo-bench console script next to this Python (pip install -e .)")
    recipe = load(path)
    judge = ((recipe["task"].get("evaluation") or {}).get("judge")) or {}
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}  # this checkout's code
    if judge.get("api_key_env"):
        environment[judge["api_key_env"]] = STAND_IN_KEY
    with serving(models=(judge.get("model", "local-judge"),)) as chat:
        rehearsed = rehearsal(recipe, chat.base_url, classifier)
        recipe_file = workdir / path.name
        recipe_file.write_text(yaml.safe_dump(rehearsed, sort_keys=False))
        command = [script, "run", str(recipe_file), "--results", str(workdir / "results")]
        result = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=1500)
        if judge.get("kind") == "llm":
            assert chat.requests, "the stand-in judge was never asked"
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return rehearsed, workdir / "results" / rehearsed["experiment"], output


def check_end_to_end(rehearsed: dict[str, Any], out: Path, workdir: Path) -> None:
    experiment = validate_recipe(rehearsed, workdir / "rehearsal.yaml")
    labels = {run.label for run in experiment.runs}
    seeds = rehearsed.get("seeds", [0])
    policies = len(seeds) * (1 + sum(len(run.grid) for run in experiment.runs))  # every method's λ, and the reference
    with (out / "leaderboard.csv").open() as table:
        assert labels | {"sft-reference"} <= {row["method"] for row in csv.DictReader(table)}
    temperatures = rehearsed["task"]["evaluation"]["temperatures"]
    run_dirs = [run_dir for run_dir in (out / "runs").iterdir() if run_dir.is_dir()]
    assert len(run_dirs) == policies
    for run_dir in run_dirs:  # sampled and judged at every temperature
        for temperature in temperatures:
            [samples] = run_dir.glob(f"evaluation-*/T{temperature:g}/samples.jsonl")
            assert samples.read_text().strip(), samples
    if rehearsed["train"].get("gradient_clip_val"):  # clipped, with the norm before clipping recorded where logged
        for record in map(json.loads, map(Path.read_text, out.glob("runs/*/record.json"))):
            logged = record["steps"] // rehearsed["train"].get("log_every_n_steps", 10)
            assert len(record["grad_norm_history"]) == logged, record["method"]
    client = tracking.open_client(f"sqlite:///{out.parent / 'mlflow.db'}")
    [tracked] = [found for found in client.search_experiments() if found.name == rehearsed["experiment"]]
    runs = tracking.search_all(client, [tracked.experiment_id], "")
    per_policy = [run for run in runs if tracking.RUN_KEY in run.data.tags]
    assert len(per_policy) == len({run.data.tags[tracking.RUN_KEY] for run in per_policy}) == policies
    assert all(run.data.tags.get(tracking.COMPLETE) == "true" for run in per_policy)


@pytest.mark.parametrize(
    "path",
    [pytest.param(path, marks=[pytest.mark.slow] if path.stem in SLOW else []) for path in REAL_SCALE],
    ids=lambda path: path.stem,
)
def test_the_recipe_runs_end_to_end_as_shipped(path: Path, tmp_path: Path, classifier: Path) -> None:
    rehearsed, out, output = rehearse(path, tmp_path, classifier)
    check_end_to_end(rehearsed, out, tmp_path)
    assert "Traceback" not in output


@pytest.mark.slow  # about 45 s on this 2-core machine
def test_the_two_minute_own_data_recipe_runs_as_shipped(tmp_path: Path) -> None:
    """A local recipe needs no swap: run it exactly as the README tells a user to."""
    script = shutil.which("expo-bench", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no expo-bench console script next to this Python (pip install -e .)")
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [script, "run", "recipes/your_pairs_tiny.yaml", "--results", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    runs = json.loads((tmp_path / "your_pairs_tiny" / "summary.json").read_text())["runs"]
    assert [run["method"] for run in runs] == ["dpo", "expo_compositional"]
    for record in map(json.loads, map(Path.read_text, (tmp_path / "your_pairs_tiny" / "runs").glob("*/record.json"))):
        assert record["steps"] > 0 and len(record["grad_norm_history"]) == record["steps"]  # clipped, logged every step
