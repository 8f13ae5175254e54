"""Evaluation wired into the pipeline: the HH twin judged by an LLM judge served on 127.0.0.1, samples and
verdicts on disk, metrics recomputed independently from them, evaluation-only runs and reuse."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from chat_server import serving
from conftest import SHARED_DATA, needs_shared_data
from rich.console import Console
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from expo_bench.errors import UserError
from expo_bench.lm.evaluator import sequence_logps
from expo_bench.recipe import validate_recipe
from expo_bench.runner import run_experiment

ROOT = Path(__file__).parent.parent
SHARED = SHARED_DATA


def hh_twin(base_url: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "recipes" / "hh_tiny_local.yaml").read_text())
    data["task"] |= {
        "source": str(SHARED / "hh-rlhf"),
        "tokenizer": str(SHARED / "tokenizers" / "gpt-neox-20b"),
        "max_train_pairs": 16,
        "max_eval_pairs": 6,
    }
    data["task"]["evaluation"] |= {"prompts": 4, "judge": data["task"]["evaluation"]["judge"] | {"base_url": base_url}}
    data["methods"] = [{"method": "dpo", "params": {"beta": 0.1}}]
    return data


@needs_shared_data()
def test_hh_twin_is_judged_by_an_llm_against_the_chosen_responses(tmp_path: Path) -> None:
    with serving() as server:  # its judge prefers the longer response
        data = hh_twin(server.base_url)
        experiment = validate_recipe(data, "hh_tiny_local.yaml")
        out = run_experiment(experiment, tmp_path, Console(quiet=True))
        first_requests = len(server.requests)
        log = Console(record=True, width=200)
        run_experiment(experiment, tmp_path, log)
        assert len(server.requests) == first_requests  # the rerun reused every stored evaluation
        assert "evaluated in an earlier run" in log.export_text()
    reference, dpo = json.loads((out / "summary.json").read_text())["runs"]
    assert reference["method"] == "sft-reference" and dpo["method"] == "dpo"
    for temperature in (0.5, 1.0):
        [judgments] = (out / "runs").glob(f"dpo-*/evaluation-*/T{temperature:g}/judgments.jsonl")
        rows = [json.loads(line) for line in judgments.read_text().splitlines()]
        assert len(rows) == 4 and {row["judge"] for row in rows} == {"llm:local-judge"}
        assert all(row["temperature"] == temperature and row["candidate_position"] in ("A", "B") for row in rows)
        assert all(row["prompt"].startswith("\n\nHuman: ") for row in rows)  # the whole dialogue, never cut mid-sentence
        # recompute the win rate from the verdicts: the server's judge prefers the longer text
        expected = [
            0.5 if row["candidate"] == row["baseline"] else float(len(row["candidate"]) > len(row["baseline"])) for row in rows
        ]
        assert [row["outcome"] for row in rows] == expected
        assert dpo["eval"][f"eval/T{temperature:g}/win_rate"] == pytest.approx(sum(expected) / 4)
    assert dpo["eval"]["eval/win_rate"] == dpo["eval"]["eval/T0.5/win_rate"]  # the first temperature heads the board
    assert "eval/reward" not in dpo["eval"]  # an LLM judge gives verdicts, not rewards
    # yet every policy has its KL(π‖π_ref), on its own samples: exactly 0 for the reference sampled at T = 1
    assert reference["eval"]["eval/T1/kl"] == 0.0 and reference["eval"]["eval/T0.5/kl"] != 0.0
    assert math.isfinite(dpo["eval"]["eval/kl"]) and dpo["eval"]["eval/kl_stderr"] > 0
    assert "KL(π‖π_ref)" in (out / "leaderboard.md").read_text()
    text = (out / "methods.md").read_text()
    assert "## Sampled evaluation" in text and "sft-reference" in text


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def first_position_share(rows: list[dict[str, Any]]) -> float:
    """From the verdict files alone: the share of a judge's answers on swapped pairs that picked A."""
    choices = [choice for row in rows if "swap_choice" in row for choice in (row["choice"], row["swap_choice"])]
    return choices.count("A") / len(choices)


@pytest.mark.slow  # about a minute: two HH twins judged by two servers (the statistics are tested fast in test_metrics)
@needs_shared_data()
def test_two_judges_score_the_same_comparisons_and_their_agreement_is_reported(tmp_path: Path) -> None:
    cohen_kappa_score = pytest.importorskip("sklearn.metrics").cohen_kappa_score
    with serving() as plain, serving(first_bias=0.5) as biased:  # two endpoints; the second favours position A
        data = hh_twin(plain.base_url)
        data["task"]["evaluation"]["temperatures"] = [0.5]
        first = data["task"]["evaluation"].pop("judge") | {"swap": 1.0}
        data["task"]["evaluation"]["judges"] = [first, first | {"base_url": biased.base_url}]
        out = run_experiment(validate_recipe(data, "hh.yaml"), tmp_path, Console(quiet=True))
        asked = len(plain.requests), len(biased.requests)
        assert asked[0] == asked[1] > 0, "both judges judge every comparison, in both orders"
        dpo = json.loads((out / "summary.json").read_text())["runs"][1]["eval"]
        board = (out / "leaderboard.md").read_text()
        # the second judge alone is another evaluation, whose every answer is already cached
        data["task"]["evaluation"] |= {"judge": data["task"]["evaluation"].pop("judges")[1]}
        alone = run_experiment(validate_recipe(data, "hh.yaml"), tmp_path, Console(quiet=True))
        assert (len(plain.requests), len(biased.requests)) == asked, "a judge on its own pays nothing twice"
    [folder] = (out / "runs").glob("dpo-*/evaluation-*/T0.5/judgments-j2.jsonl")
    ones, twos = rows_of(folder.parent / "judgments.jsonl"), rows_of(folder)
    assert {row["judge"] for row in ones} == {row["judge"] for row in twos} == {"llm:local-judge"}
    assert [row["candidate"] for row in ones] == [row["candidate"] for row in twos]
    outcomes = [[str(row["outcome"]) for row in rows] for rows in (ones, twos)]
    assert dpo["eval/T0.5/j1_j2/kappa"] == pytest.approx(cohen_kappa_score(*outcomes), nan_ok=True)
    assert dpo["eval/T0.5/j1_j2/agreement"] == pytest.approx(sum(a == b for a, b in zip(*outcomes, strict=True)) / 4)
    assert dpo["eval/T0.5/j2/win_rate"] == pytest.approx(sum(row["outcome"] for row in twos) / 4)
    assert dpo["eval/T0.5/first_position_wins"] == pytest.approx(first_position_share(ones))
    assert dpo["eval/T0.5/j2/first_position_wins"] == pytest.approx(first_position_share(twos))
    assert dpo["eval/T0.5/swapped"] == dpo["eval/T0.5/j2/swapped"] == sum("swap_choice" in row for row in ones)
    assert all(title in board for title in ("P(first wins)", "self-consistency", "win rate j2", "κ j1–j2", "agreement j1–j2"))
    single = json.loads((alone / "summary.json").read_text())["runs"][1]["eval"]
    assert single["eval/win_rate"] == dpo["eval/j2/win_rate"] and "eval/j1_j2/kappa" not in single


@needs_shared_data()
def test_evaluation_only_refuses_a_run_that_never_trained(tmp_path: Path) -> None:
    with serving() as server:
        data = hh_twin(server.base_url)
        data["task"]["evaluation"]["evaluate_only"] = True
        data["task"]["sft"] = None
        with pytest.raises(UserError, match=r"have not finished training \(seed 0\): dpo λ=0.1 under .*train them first"):
            run_experiment(validate_recipe(data, "hh.yaml"), tmp_path, Console(quiet=True))


@needs_shared_data()
def test_an_unreachable_judge_fails_before_any_work(tmp_path: Path) -> None:
    data = hh_twin("http://127.0.0.1:9/v1")  # nothing listens on the discard port
    data["task"]["sft"] = None
    with pytest.raises(UserError, match=r"127\.0\.0\.1:9/v1 is not reachable .*--set task\.evaluation=null"):
        run_experiment(validate_recipe(data, "hh.yaml"), tmp_path, Console(quiet=True))
    assert not (tmp_path / "hh_tiny_local" / "runs").exists()  # its endpoint is asked before anything else


@needs_shared_data()
def test_hh_evaluation_needs_a_judge() -> None:
    data = hh_twin("http://127.0.0.1:9/v1")
    del data["task"]["evaluation"]["judge"]
    with pytest.raises(UserError, match=r"evaluation\.judge"):
        validate_recipe(data, "hh.yaml")


def test_the_judges_settings_leave_earlier_recipes_digests_alone() -> None:
    before = validate_recipe(hh_twin("http://127.0.0.1:9/v1"), "hh.yaml").recipe
    evaluation = before.task.evaluation  # type: ignore[attr-defined]
    dumped = evaluation.model_dump(mode="json")
    assert "judges" not in dumped and "calibrate" not in dumped, "unset, the new fields are not in any digest"
    assert not {"swap", "inconsistent_as_tie"} & set(dumped["judge"])
    data = hh_twin("http://127.0.0.1:9/v1")
    data["task"]["evaluation"]["judge"] |= {"swap": 0.1, "inconsistent_as_tie": False}  # the defaults, spelled out
    assert validate_recipe(data, "hh.yaml").recipe.fingerprint() == before.fingerprint()
    data["task"]["evaluation"]["judge"]["swap"] = 1.0
    assert validate_recipe(data, "hh.yaml").recipe.fingerprint() != before.fingerprint()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"judges": "both"}, "set judge .one. or judges .several., not both"),
        ({"calibrate": True}, "calibrate compares the recipe's judges with the task's own ground truth"),
        ({"judge": {"swap": 0.0, "inconsistent_as_tie": True}}, "inconsistent_as_tie needs pairs judged in both orders"),
        ({"judge": {"swap": 1.5}}, r"evaluation\.judge\.llm\.swap"),
    ],
)
def test_judge_settings_are_validated(change: dict[str, Any], message: str) -> None:
    data = hh_twin("http://127.0.0.1:9/v1")
    evaluation = data["task"]["evaluation"]
    if "judges" in change:
        evaluation["judges"] = [evaluation["judge"], evaluation["judge"]]
    elif "judge" in change:
        evaluation["judge"] |= change["judge"]
    else:
        evaluation |= change
    with pytest.raises(UserError, match=message):
        validate_recipe(data, "hh.yaml")


def test_imdb_can_calibrate_an_llm_judge_against_its_reward_model() -> None:
    data = yaml.safe_load((ROOT / "recipes" / "imdb_tiny_local.yaml").read_text())
    judge = hh_twin("http://127.0.0.1:9/v1")["task"]["evaluation"]["judge"]
    data["task"]["evaluation"] |= {"judge": judge, "calibrate": True}
    evaluation = validate_recipe(data, "imdb.yaml").recipe.task.evaluation  # type: ignore[attr-defined]
    assert evaluation.calibrate and [judge.model for judge in evaluation.panel] == ["local-judge"]


def test_sequence_logps_at_a_temperature_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt_neox",
        vocab_size=11,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = AutoModelForCausalLM.from_config(config)
    prompts, responses = [[1, 2], [3]], [[4, 5, 6], [7]]
    got = sequence_logps(model, prompts, responses, pad=0, batch_size=1, temperature=0.5)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logps = F.log_softmax(model(input_ids=ids).logits[0] / 0.5, dim=-1)
        direct = sum(float(logps[len(prompt) + t - 1, token]) for t, token in enumerate(response))
        assert math.isclose(float(got[row]), direct, rel_tol=1e-5)
