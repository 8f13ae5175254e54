"""The embedded quickstart task: its exact reward, BT labels and optimal policy, and the quickstart end to end."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from expo_bench import metric_keys
from expo_bench.recipe import validate_recipe
from expo_bench.runner import run_experiment
from expo_bench.tasks.synthetic_tokens import SyntheticTokensTask

ROOT = Path(__file__).parent.parent


def task(**changes: object) -> SyntheticTokensTask:
    return SyntheticTokensTask.model_validate({"kind": "synthetic_tokens", "prompts": 3, **changes})


def test_optimal_policy_is_the_product_of_per_token_softmaxes() -> None:
    synthetic = task()
    optimal = synthetic.optimal_policy()
    per_token = torch.softmax(synthetic.weights, dim=-1)
    for x in range(3):
        for index, response in enumerate(synthetic.responses):
            assert float(optimal[x, index]) == pytest.approx(math.prod(float(per_token[x, t]) for t in response), rel=1e-12)
    assert torch.allclose(optimal.sum(-1), torch.ones(3, dtype=torch.float64))
    assert len(synthetic.responses) == 4**3


def test_oracle_reward_reads_the_text_and_ranks_malformed_responses_last() -> None:
    synthetic = task()
    w = synthetic.weights
    assert synthetic.reward("p1", "a c c") == pytest.approx(float(w[1, 0] + 2 * w[1, 2]))
    worst = float(synthetic.rewards[1].min())
    for malformed in ("", "a c", "a c c d", "a p0 c", "a <eos> c"):
        assert synthetic.reward("p1", malformed) == worst - 1.0


def test_pairs_are_labelled_by_bradley_terry_on_the_reward() -> None:
    synthetic = task(prompts=2, reward_scale=0.5)
    pairs = synthetic._pairs(4000, random.Random(0), held_out=False)
    rewards = {
        (f"p{x}", synthetic.text(y)): float(synthetic.rewards[x, i]) for x in range(2) for i, y in enumerate(synthetic.responses)
    }
    margins = [rewards[(pair.prompt, pair.chosen)] - rewards[(pair.prompt, pair.rejected)] for pair in pairs]
    # P(the higher-reward response is chosen) = σ(|Δr|): compare the observed count with its expectation
    agree = sum(margin > 0 for margin in margins)
    expected = sum(1 / (1 + math.exp(-abs(margin))) for margin in margins)
    variance = sum(p * (1 - p) for p in (1 / (1 + math.exp(-abs(margin))) for margin in margins))
    assert abs(agree - expected) < 4 * math.sqrt(variance)
    assert all(pair.chosen != pair.rejected for pair in pairs)


def test_exact_metrics_of_a_uniform_model_match_the_closed_form() -> None:
    synthetic = task(
        model={
            "tiny": {
                "model_type": "gpt_neox",
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "max_position_embeddings": 8,
            }
        }
    )
    tokenizer = synthetic.load_tokenizer()
    model = synthetic.model.build(vocab_size=len(tokenizer))
    for parameter in model.parameters():
        torch.nn.init.zeros_(parameter)  # zero logits: every token has probability 1/V at every step
    prompts = [[tokenizer.convert_tokens_to_ids(f"p{x}")] for x in range(3)]
    metrics = synthetic.exact_metrics(tokenizer, model)(model, prompts)
    vocabulary, steps = len(tokenizer), synthetic.response_length + 1  # the response tokens and EOS
    optimal = synthetic.optimal_policy()
    entropy = float((optimal * optimal.log()).sum())
    assert metrics[metric_keys.KL_TO_TARGET.key] == pytest.approx(
        entropy + 3 * steps * math.log(vocabulary), rel=1e-6
    )  # float32 logits
    assert metrics[metric_keys.TOP_RESPONSE_MASS.key] == pytest.approx(vocabulary**-steps, rel=1e-6)
    assert metrics[metric_keys.KL_EXACT.key] == 0.0  # the model against itself, by enumeration
    # the split: π(W) = 64/V^4 of the mass on the well-formed set, uniform within it
    well_formed = len(synthetic.responses) * vocabulary**-steps
    assert metrics[metric_keys.MALFORMED_LEAK.key] == pytest.approx(-3 * math.log(well_formed), rel=1e-6)
    assert metrics[metric_keys.KL_WELL_FORMED.key] == pytest.approx(entropy + 3 * math.log(len(synthetic.responses)), rel=1e-5)
    total = metrics[metric_keys.KL_WELL_FORMED.key] + metrics[metric_keys.MALFORMED_LEAK.key]
    assert total == pytest.approx(metrics[metric_keys.KL_TO_TARGET.key], rel=1e-9)
    # on a subset of prompts: the sums over those prompts only
    one = synthetic.exact_metrics(tokenizer, model)(model, prompts[1:2])
    assert one[metric_keys.MALFORMED_LEAK.key] == pytest.approx(metrics[metric_keys.MALFORMED_LEAK.key] / 3, rel=1e-6)


def test_trained_policy_splits_its_distance_exactly() -> None:
    """On a trained-looking (random) model too, KL(π*‖π) = KL(π*‖π̃) − log π(W) to float precision."""
    synthetic = task()
    tokenizer = synthetic.load_tokenizer()
    torch.manual_seed(3)
    model = synthetic.model.build(vocab_size=len(tokenizer))
    prompts = [[tokenizer.convert_tokens_to_ids(f"p{x}")] for x in range(3)]
    metrics = synthetic.exact_metrics(tokenizer, model)(model, prompts)
    total = metrics[metric_keys.KL_WELL_FORMED.key] + metrics[metric_keys.MALFORMED_LEAK.key]
    assert total == pytest.approx(metrics[metric_keys.KL_TO_TARGET.key], rel=1e-9)
    assert metrics[metric_keys.MALFORMED_LEAK.key] > 0 and metrics[metric_keys.KL_WELL_FORMED.key] > 0


def test_held_out_pairs_share_no_response_with_sft_or_training_pairs() -> None:
    synthetic = task(held_out_responses=0.25)
    tokenizer = synthetic.load_tokenizer()
    examples = synthetic.sft_examples(0, tokenizer, Console(quiet=True))

    def responses(pairs: list) -> set[tuple[int, ...]]:
        return {(*pair.prompt_ids, -1, *ids) for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)}

    train, held_out = responses(examples.train), responses(examples.held_out)
    assert train and held_out and not train & held_out
    assert all(len(kept) == 16 for kept in synthetic.held_out)  # a quarter of the 64 responses of each prompt
    everything = task(held_out_responses=0.0)
    both = everything.sft_examples(0, tokenizer, Console(quiet=True))
    assert responses(both.train) & responses(both.held_out)  # without a held-out set, they overlap


def test_too_few_held_out_responses_are_refused() -> None:
    with pytest.raises(ValueError, match="each side needs at least 2"):
        task(response_tokens=2, response_length=2, held_out_responses=0.25)  # 1 of 4 responses held out


def test_tokenizer_round_trips_prompts_and_responses() -> None:
    tokenizer = task().load_tokenizer()
    ids = tokenizer("p2 a b d", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == "p2 a b d"
    assert tokenizer.unk_token_id not in ids


def test_quickstart_slice_runs_end_to_end_and_reuses_its_work(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data["seeds"] = [0]
    data["task"] |= {"prompts": 4, "train_pairs_per_prompt": 32}
    data["task"]["evaluation"] |= {"samples_per_prompt": 8, "selection": {"prompts": 2}}
    data["methods"] = [{"method": "expo_compositional", "params": {"lam": 0.1}}, {"method": "dpo", "params": {"beta": 0.1}}]
    experiment = validate_recipe(data, "quickstart.yaml")
    out = run_experiment(experiment, tmp_path, Console(quiet=True))
    reference, *runs = json.loads((out / "summary.json").read_text())["runs"]
    # the reference judged against its own seeded samples: all ties, zero KL
    assert reference["eval"][metric_keys.WIN_RATE.key] == 0.5 and reference["eval"][metric_keys.KL.key] == 0.0
    assert [run["method"] for run in runs] == ["expo_compositional", "dpo"]
    for run in runs:
        metrics = run["eval"]
        assert metrics[metric_keys.JUDGED.key] == 2 * 8 and metrics[metric_keys.INVALID_VERDICTS.key] == 0  # p2, p3
        # p0, p1 picked the configuration: their metrics are logged apart and never reported
        selected = metric_keys.selection_key(metric_keys.KL_TO_TARGET.key)
        assert metrics[selected] > 0 and metrics[selected] != metrics[metric_keys.KL_TO_TARGET.key]
        [judgments] = (out / "runs").glob(f"{run['method']}-*/evaluation-*/T1/judgments.jsonl")
        rows = [json.loads(line) for line in judgments.read_text().splitlines()]
        assert sum(row["outcome"] for row in rows) / len(rows) == pytest.approx(metrics[metric_keys.WIN_RATE.key])
        assert sum(row["candidate_reward"] for row in rows) / len(rows) == pytest.approx(metrics[metric_keys.REWARD.key])
        assert metrics[metric_keys.KL_TO_TARGET.key] > 0 and 0 < metrics[metric_keys.TOP_RESPONSE_MASS.key] < 1
    log = Console(record=True, width=200)
    run_experiment(experiment, tmp_path, log)
    text = log.export_text()
    assert text.count("evaluated in an earlier run") == 3 and "SFT: held-out NLL" in text and "steps, from the cache" in text
    assert "reference log-probs of 160 pairs: from the cache" in text  # the cached SFT weights are the same reference
    assert json.loads((out / "summary.json").read_text())["runs"][1]["eval"] == runs[0]["eval"]

    # evaluation only: a lost evaluation is recomputed from the run's checkpoint, to the same numbers
    [evaluation] = (out / "runs").glob("dpo-*/evaluation-*")
    shutil.rmtree(evaluation)
    data["task"]["evaluation"]["evaluate_only"] = True
    log = Console(record=True, width=200)
    run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, log)
    assert "dpo λ=0.1: finished in an earlier run" in log.export_text()
    restored = json.loads((out / "summary.json").read_text())["runs"][2]
    assert restored["method"] == "dpo" and restored["eval"] == runs[1]["eval"]


def test_periodic_evaluation_logs_metrics_during_training(tmp_path: Path) -> None:
    from expo_bench.tracking import open_client

    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data["seeds"] = [0]
    data["task"] |= {"prompts": 2, "train_pairs_per_prompt": 16, "sft": None}
    data["task"]["evaluation"] |= {"samples_per_prompt": 4, "every_n_steps": 1, "selection": {"prompts": 1}}
    data["train"] |= {"max_epochs": 2, "batch_size": 16}
    data["methods"] = [{"method": "dpo", "params": {"beta": 0.1}}]
    out = run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, Console(quiet=True))
    run = json.loads((out / "summary.json").read_text())["runs"][1]
    assert [step for step, _ in run["eval_history"]] == [1, 2, 3, 4]  # 2 batches × 2 epochs
    assert all(metric_keys.KL_TO_TARGET.key in metrics for _, metrics in run["eval_history"])
    client = open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [tracked] = client.search_runs(
        [client.get_experiment_by_name("quickstart").experiment_id], "tags.`expo_bench.method` = 'dpo'"
    )
    history = client.get_metric_history(tracked.info.run_id, metric_keys.WIN_RATE.key)
    assert sorted(point.step for point in history) == [0, 1, 2, 3, 4]  # during training, then the final evaluation


def test_responses_enumerate_every_sequence_once() -> None:
    synthetic = task(response_tokens=3, response_length=2)
    assert synthetic.responses == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def test_instances_draw_their_own_reward_table_and_held_out_responses() -> None:
    assert task().task_instances() == [(None, task())]  # no instances named: the task itself, runs untagged
    several = task(instances=[0, 7])
    (first_name, first), (second_name, second) = several.task_instances()
    assert (first_name, second_name) == ("0", "7")
    assert first == task(reward_seed=0) and second == task(reward_seed=7)
    assert torch.equal(first.weights, task().weights) and not torch.equal(second.weights, first.weights)
    assert second.held_out != first.held_out
    with pytest.raises(ValueError, match="instance seeds must be distinct"):
        task(instances=[1, 1])


def test_a_recipe_without_instances_keeps_its_data_and_so_its_stored_runs() -> None:
    """The committed tuned comparison's seed-0 data fingerprint (part of every run directory's digest and run key) comes
    back from the recipe as shipped, and from its instance 0 when the recipe names instances."""
    committed = json.loads((ROOT / "results" / "synthetic_tokens_tuned" / "summary.json").read_text())
    fingerprint = next(run["data_fingerprint"] for run in committed["runs"] if run["seed"] == 0)
    recipe = yaml.safe_load((ROOT / "recipes" / "synthetic_tokens_tuned.yaml").read_text())
    shipped = validate_recipe(recipe, "tuned.yaml").recipe.task
    recipe["task"]["instances"] = [0, 1]
    named = validate_recipe(recipe, "tuned.yaml").recipe.task
    assert isinstance(shipped, SyntheticTokensTask) and isinstance(named, SyntheticTokensTask)
    fingerprints = [seed_zero_fingerprint(instance) for _, instance in [*shipped.task_instances(), *named.task_instances()]]
    assert fingerprints[:2] == [fingerprint, fingerprint] and fingerprints[2] != fingerprint


def seed_zero_fingerprint(instance: object) -> str:
    from expo_bench.lm.data import fingerprint_pairs

    assert isinstance(instance, SyntheticTokensTask)
    console = Console(quiet=True)
    tokenizer = instance.load_tokenizer()
    examples = instance.sft_examples(0, tokenizer, console)
    data = instance.task_data(0, tokenizer, None, examples, Path("unused"), console)  # type: ignore[arg-type]
    return fingerprint_pairs(data.train + data.evaluation)


def test_instances_run_nested_seeds_and_reuse_the_runs_of_the_instance_they_had(tmp_path: Path) -> None:
    from expo_bench.leaderboard import load_leaderboard
    from expo_bench.tracking import resolve_tracking_uri

    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data["seeds"] = [0, 1]
    data["task"] |= {"prompts": 3, "train_pairs_per_prompt": 16}
    data["task"]["evaluation"] |= {"samples_per_prompt": 4, "selection": {"prompts": 1}}
    data["methods"] = [{"method": "dpo", "params": {"beta": 0.1}}]
    run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, Console(quiet=True))
    data["task"]["instances"] = [0, 5]
    log = Console(record=True, width=200)
    out = run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, log)
    text = log.export_text()
    assert text.count("dpo λ=0.1: finished in an earlier run") == 2  # instance 0's two seeds, trained before
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [(run.get("instance"), run["seed"], run["method"]) for run in runs] == [
        (instance, seed, method) for instance in ("0", "5") for seed in (0, 1) for method in ("sft-reference", "dpo")
    ]
    assert "| dpo | 0.1 | 1 (instance 5) |" in (out / "methods.md").read_text()
    tables = load_leaderboard(resolve_tracking_uri(None, tmp_path), data["experiment"])
    assert [table.instances for table in tables] == [("0",), ("5",), ("0", "5")]
    assert all(row.estimates[metric_keys.KL_TO_TARGET.key].n == 2 for table in tables for row in table.rows)


def test_calibration_reports_an_llm_judges_agreement_with_the_oracle(tmp_path: Path) -> None:
    from chat_server import serving
    from sklearn.metrics import cohen_kappa_score

    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data["seeds"] = [0]
    data["task"] |= {"prompts": 2, "train_pairs_per_prompt": 16, "sft": None}
    data["train"] |= {"max_epochs": 1, "batch_size": 16}
    data["methods"] = [{"method": "dpo", "params": {"beta": 0.1}}]
    with serving() as server:  # the stand-in prefers the longer text: here a coin the oracle disagrees with at will
        judge = {"kind": "llm", "base_url": server.base_url, "model": "local-judge", "api_key_env": None, "swap": 1.0}
        data["task"]["evaluation"] |= {"samples_per_prompt": 16, "selection": None, "judge": judge, "calibrate": True}
        out = run_experiment(validate_recipe(data, "quickstart.yaml"), tmp_path, Console(quiet=True))
    metrics = json.loads((out / "summary.json").read_text())["runs"][1]["eval"]
    [llm] = (out / "runs").glob("dpo-*/evaluation-*/T1/judgments.jsonl")
    llm_rows = [json.loads(line) for line in llm.read_text().splitlines()]
    truth_rows = [json.loads(line) for line in (llm.parent / "judgments-truth.jsonl").read_text().splitlines()]
    assert {row["judge"] for row in truth_rows} == {"oracle"} and len(truth_rows) == len(llm_rows) == 2 * 16
    oracle = [row["outcome"] for row in truth_rows]
    assert metrics["eval/truth/win_rate"] == pytest.approx(sum(oracle) / len(oracle))
    assert metrics[metric_keys.REWARD.key] == pytest.approx(sum(row["candidate_reward"] for row in truth_rows) / 32)
    labels = [[str(row["outcome"]) for row in rows] for rows in (llm_rows, truth_rows)]
    assert metrics["eval/j1_truth/kappa"] == pytest.approx(cohen_kappa_score(*labels))
    assert metrics["eval/j1_truth/n"] == 32 and "eval/first_position_wins" in metrics
    assert "κ j1–truth" in (out / "leaderboard.md").read_text()
