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
from expo_bench.lm.evaluation import sequence_logps
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
    text = (out / "methods.md").read_text()
    assert "## Sampled evaluation" in text and "sft-reference" in text


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
