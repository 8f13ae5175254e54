"""The tabular task: the authors' data protocol, the population objective, replicas, reproducibility."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from rich.console import Console

from expo_bench import tracking
from expo_bench.errors import RecipeError
from expo_bench.methods import method_class
from expo_bench.optim import OptimizerConfig
from expo_bench.recipe import validate_recipe
from expo_bench.runner import run_experiment
from expo_bench.tabular.data import TabularPreferenceData, bradley_terry, make_batch, population_pairs, sample_pairs
from expo_bench.tabular.policy import TabularPolicy
from expo_bench.train_config import TrainConfig
from expo_bench.trainer import build_trainer

PI_STAR = [0.6, 0.3, 0.1]
PI_REF = torch.tensor([[0.4, 0.4, 0.2]])


def test_authors_seed_gives_their_pair_count() -> None:
    pairs = sample_pairs([PI_STAR], draws_per_prompt=300, seed=100)
    assert len(pairs) == 213
    assert bool((pairs.chosen != pairs.rejected).all()) and bool((pairs.label == 1).all())
    again = sample_pairs([PI_STAR], draws_per_prompt=300, seed=100)
    assert torch.equal(pairs.chosen, again.chosen) and torch.equal(pairs.rejected, again.rejected)


def test_sampled_orderings_follow_bradley_terry() -> None:
    pairs = sample_pairs([PI_STAR], draws_per_prompt=60_000, seed=0)
    y1_over_y3 = ((pairs.chosen == 0) & (pairs.rejected == 2)).sum() / (
        ((pairs.chosen == 0) & (pairs.rejected == 2)) | ((pairs.chosen == 2) & (pairs.rejected == 0))
    ).sum()
    assert float(y1_over_y3) == pytest.approx(bradley_terry(PI_STAR, 0, 2), abs=0.01)  # 6/7, ~13k pairs


def test_population_pairs_carry_exact_preferences() -> None:
    pairs = population_pairs([PI_STAR, [0.5, 0.25, 0.25]])
    assert len(pairs) == 6
    assert pairs.label.tolist() == pytest.approx([2 / 3, 6 / 7, 3 / 4, 2 / 3, 2 / 3, 1 / 2])


def test_kl_samples_enumerate_each_prompt_weighted_by_reference() -> None:
    pairs = population_pairs([PI_STAR, PI_STAR])
    pi_ref = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.2, 0.7]])
    batch = make_batch(pairs, torch.tensor([0, 4]), pi_ref)
    assert batch.kl_samples is not None and batch.kl_weights is not None
    assert batch.kl_samples["prompt"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.kl_samples["response"].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.kl_weights.tolist() == pytest.approx([0.2, 0.2, 0.1, 0.05, 0.1, 0.35])


def fit(method: str, params: list[dict[str, Any]], epochs: int = 2) -> torch.Tensor:
    """Train a λ-grid as replicas with gradient clipping; return the final logits ``(G, P, R)``."""
    cls = method_class(method)
    pairs = sample_pairs([PI_STAR], draws_per_prompt=60, seed=3)
    L.seed_everything(3, verbose=False)
    train = TrainConfig(max_epochs=epochs, batch_size=8, optimizer=OptimizerConfig(lr=0.05), gradient_clip_val=0.5)
    module = cls(
        TabularPolicy(PI_REF, replicas=len(params)), TabularPolicy(PI_REF), [cls.Params(**p) for p in params], train.optimizer
    )
    build_trainer(train, [], accelerator="cpu", devices=1).fit(
        module, datamodule=TabularPreferenceData(pairs, PI_REF, train.batch_size, seed=3)
    )
    return module.policy.logits.detach()


@pytest.mark.parametrize(("method", "field"), [("dpo", "beta"), ("expo_compositional", "lam"), ("ipo", "tau")])
def test_replicas_follow_exactly_their_standalone_trajectories(method: str, field: str) -> None:
    grid = [{field: 0.01}, {field: 1.0}, {field: 100.0}]
    together = fit(method, grid)
    alone = torch.cat([fit(method, [params]) for params in grid])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(together[0], together[2], atol=1e-3)  # the replicas did diverge


def tiny_recipe(**changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "experiment": "tiny",
        "seeds": [7],
        "task": {
            "kind": "tabular",
            "prompts": [{"name": "x", "pi_star": PI_STAR, "pi_ref": [0.4, 0.4, 0.2]}],
            "draws_per_prompt": 40,
            "population": {"steps": 50, "lr": 0.05},
        },
        "train": {"max_epochs": 3, "batch_size": 8, "optimizer": {"name": "Adam", "lr": 0.01}, "gradient_clip_val": 10.0},
        "lam": [0.1, 10.0],
        "methods": [{"method": "dpo"}, {"method": "expo_compositional"}, {"method": "expo_regression", "lam": [0.1, 0.9]}],
    }
    recipe.update(changes)
    return recipe


def run_tiny(tmp_path: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    out = run_experiment(validate_recipe(recipe, "tiny.yaml"), tmp_path, Console(quiet=True))
    return json.loads((out / "summary.json").read_text())


def test_run_writes_summary_tables_and_plots(tmp_path: Path) -> None:
    summary = run_tiny(tmp_path, tiny_recipe())
    out = tmp_path / "tiny"
    assert {"recipe_hash", "git_sha", "packages", "resolved_recipe", "runs"} <= set(summary)
    assert len(summary["runs"]) == 3 * 2 * 2  # methods × λ × {sampled, population}
    run = summary["runs"][0]
    assert {"method", "params", "seed", "lam", "final_policy", "kl_star_to_policy", "steps"} <= set(run)
    assert run["params"]["beta"] == 0.1 and run["seed"] == 7 and run["steps"] == 3 * 4  # 26 pairs / batch 8 = 4 steps
    assert sum(run["final_policy"]["x"]) == pytest.approx(1.0)
    table = (out / "final_policies.md").read_text()
    assert table.count("| expo_regression |") == 4
    for plot in ("trajectories.png", "lambda_sweep.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracked_runs_keep_the_keys_names_and_config_keys_earlier_versions_wrote(tmp_path: Path) -> None:
    """A finished store from before a refactor is found again (these are what commit e661a43 wrote)."""
    run_tiny(tmp_path, tiny_recipe())
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracked = {
        run.data.tags[tracking.RUN_KEY]: (run.info.run_name, run.data.tags[tracking.CONFIG_KEY], run.data.tags[tracking.DATASET])
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
        if tracking.RUN_KEY in run.data.tags
    }
    assert len(tracked) == 12
    assert tracked["112b537c3016"] == ("dpo λ=0.1 population s7", "c01b8b0f4d96", "tiny/population")
    assert tracked["d6854f1f7c85"] == ("expo_compositional λ=10 population s7", "901910590e0e", "tiny/population")
    assert tracked["2dca436d0918"] == ("expo_regression λ=0.9 sampled s7", "fac77d53337d", "tiny/sampled")


def test_same_seed_reproduces_the_same_numbers(tmp_path: Path) -> None:
    def numbers(summary: dict[str, Any]) -> list[Any]:
        return [(r["method"], r["objective"], r["lam"], r["final_policy"]) for r in summary["runs"]]

    first = run_tiny(tmp_path / "a", tiny_recipe())
    second = run_tiny(tmp_path / "b", tiny_recipe())
    assert numbers(first) == numbers(second)
    assert first["recipe_hash"] == second["recipe_hash"]
    other_seed = run_tiny(tmp_path / "c", tiny_recipe(seeds=[8]))
    assert numbers(other_seed) != numbers(first)


def test_a_user_method_plugs_in_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_methods.py").write_text(
        "from expo_bench.methods.dpo import DPO\n\n"
        "class HalfDPO(DPO):\n"
        "    def objective(self, logps, batch):\n"
        "        return {name: 0.5 * value for name, value in super().objective(logps, batch).items()}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tiny_recipe(methods=[{"method": "my_methods:HalfDPO", "label": "half"}, {"method": "dpo"}])
    summary = run_tiny(tmp_path / "out", recipe)
    assert {run["method"] for run in summary["runs"]} == {"half", "dpo"}
    assert summary["runs"][0]["method_class"] == "my_methods:HalfDPO"
    # it replaced the base's pairwise objective, so a margin would not reach its loss: refused, not ignored
    recipe["methods"][0]["params"] = {"gamma": 0.5}
    with pytest.raises(RecipeError) as caught:
        validate_recipe(recipe, "tiny.yaml")
    [(path, message)] = caught.value.problems
    assert path == "methods[0].params.gamma" and "takes no margin gamma" in message


@pytest.fixture(scope="module")
def population_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Both paper recipes with a 1-epoch sampled budget: their population runs are the part under test."""
    results = {}
    for name in ("synthetic_interpolation", "synthetic_preservation"):
        data = yaml.safe_load((Path(__file__).parent.parent / f"recipes/{name}.yaml").read_text())
        data["train"]["max_epochs"] = 1
        for entry in data["methods"]:
            entry.get("train", {}).pop("max_epochs", None)
        summary = run_tiny(tmp_path_factory.mktemp(name), data)
        results[name] = [run for run in summary["runs"] if run["objective"] == "population"]
    return results


def by(runs: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [run for run in runs if run["method"] == method]


def test_population_interpolation(population_results: dict[str, list[dict[str, Any]]]) -> None:
    runs = population_results["synthetic_interpolation"]
    for method in ("expo_compositional", "expo_regression"):
        small, large = by(runs, method)
        assert small["final_policy"]["x"] == pytest.approx(PI_STAR, abs=0.005)  # EXPO recovers π* at λ → 0
        assert large["final_policy"]["x"] == pytest.approx([0.4, 0.4, 0.2], abs=0.01)  # and stays at π_ref at large λ
    for method in ("dpo", "ipo", "fdpo_js"):
        small, large = by(runs, method)
        assert small["final_policy"]["x"][2] < 0.01  # degenerate: y3 is driven out
        assert large["final_policy"]["x"] == pytest.approx([0.4, 0.4, 0.2], abs=0.01)


def test_population_preservation(population_results: dict[str, list[dict[str, Any]]]) -> None:
    runs = population_results["synthetic_preservation"]
    for method in ("expo_compositional", "expo_regression"):
        good = [run["kl_star_to_policy"]["good"] for run in by(runs, method)]
        bad = [run["kl_star_to_policy"]["bad"] for run in by(runs, method)]
        assert max(good) < 1e-4  # preservation: π_ref = π* stays put for every λ
        # at the grid's largest λ = e^5 it has nearly reached π_ref
        assert bad[0] < 1e-3 and bad[-1] == pytest.approx(runs[0]["kl_star_to_reference"]["bad"], rel=0.05)
        # Rises monotonically toward KL(π* ‖ π_ref), up to Adam's jitter at lr 0.01 near the optimum.
        assert all(later >= earlier - 1e-3 for earlier, later in itertools.pairwise(bad))
    for method in ("dpo", "ipo", "fdpo_js"):
        small = by(runs, method)[0]
        assert small["kl_star_to_policy"]["good"] > 0.1 and small["kl_star_to_policy"]["bad"] > 0.1
