"""The HH twin on several CPU ranks (gloo): FSDP on 2 ranks trains to the weights and gathered metrics of one process
(with gradient-norm clipping active on every step), samples and scores the same, resumes from its checkpoint, and
leaves every side effect to one owner; 2 "nodes" × 1 process equal 1 node × 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from chat_server import ChatServer, serving
from conftest import SHARED_DATA, needs_shared_data
from network import free_port
from rich.console import Console
from safetensors.torch import load_file

from expo_bench import tracking
from expo_bench.lm import sampling
from expo_bench.recipe import validate_recipe
from expo_bench.runner import run_experiment, start_ranks
from expo_bench.trainer import LossHistory

ROOT = Path(__file__).parent.parent
SHARED = SHARED_DATA
pytestmark = [
    needs_shared_data(),
    pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend"),
]
TINY = {"model_type": "gpt_neox", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 64}  # fmt: skip
GLOBAL_BATCH = 8
SGD = {"name": "SGD", "lr": 0.5, "kwargs": {"momentum": 0.5}}  # with state: Lightning's FSDP resume needs some
CLIP = 0.05
"""Below every gradient norm of the twin: clipping scales every step of SFT and of the method."""


def twin(judge_url: str, devices: int, num_nodes: int = 1) -> dict[str, Any]:
    """The HH twin in small: SFT, reference samples and cached log-probs, EXPO, evaluation by an LLM judge (also
    during training). SGD, not Adam: Adam's first steps turn float noise on near-zero gradients into ±lr updates."""
    per_rank = GLOBAL_BATCH // (devices * num_nodes)
    hardware = {
        "accelerator": "cpu",
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": "fsdp" if devices * num_nodes > 1 else "auto",
    }
    return {
        "experiment": "twin",
        "seeds": [0],
        "task": {
            "kind": "hh",
            "source": str(SHARED / "hh-rlhf"),
            "data_dir": "helpful-base",
            "train_split": "test",
            "eval_split": "test",
            "max_train_pairs": 16,
            "max_eval_pairs": 8,
            "tokenizer": str(SHARED / "tokenizers" / "gpt-neox-20b"),
            "tokenization": {"max_length": 32, "max_prompt_length": 24},
            "model": {"tiny": TINY},
            "reference_samples": {"samples_per_prompt": 2, "max_new_tokens": 6, "batch_size": 3},
            "sft": {"max_epochs": 1, "batch_size": per_rank, "optimizer": SGD, "gradient_clip_val": CLIP},
            "evaluation": {
                "temperatures": [1.0],
                "prompts": 5,
                "max_new_tokens": 6,
                "batch_size": 2,
                "baseline": "chosen",
                "every_n_steps": 2,
                "judge": {"kind": "llm", "base_url": judge_url, "model": "local-judge", "api_key_env": None},
            },
        },
        "train": {"max_epochs": 2, "batch_size": per_rank, "optimizer": SGD, "gradient_clip_val": CLIP, "log_every_n_steps": 1}
        | hardware,
        "methods": [{"method": "expo_compositional", "params": {"lam": 0.1}}],
    }


class Interrupted(Exception):
    """Stands for a machine lost mid-run."""


def fail_in_second_epoch(self: LossHistory, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    if trainer.current_epoch == 1:
        raise Interrupted


def run_rank(rank: int, world: int, port: int, recipe: dict[str, Any], results: Path, interrupt: bool) -> None:
    """One rank of a run (or the only process), counting the sampling slices it draws into ``results``."""
    if world > 1:
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
        os.environ |= {"NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank)}
    slices: Counter[str] = Counter()
    draw = sampling._sample_slice

    def counted(model: Any, prompts: Any, generation: Any, seed: int, eos: int) -> Any:
        slices[f"{generation.temperature}/{generation.num_return_sequences}/{seed}"] += 1
        return draw(model, prompts, generation, seed, eos)

    experiment = validate_recipe(recipe, "twin.yaml")
    console = Console(quiet=True)
    start_ranks([experiment], console)
    original = LossHistory.on_train_epoch_start
    sampling._sample_slice = counted  # type: ignore[assignment]
    if interrupt:
        LossHistory.on_train_epoch_start = fail_in_second_epoch  # type: ignore[method-assign]
    try:
        run_experiment(experiment, results, console)
    except Interrupted:
        pass
    finally:
        sampling._sample_slice = draw  # type: ignore[assignment]
        LossHistory.on_train_epoch_start = original  # type: ignore[method-assign]
    (results / f"slices-rank{rank}{'-interrupted' if interrupt else ''}.json").write_text(json.dumps(slices))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def on_ranks(world: int, recipe: dict[str, Any], results: Path, interrupt: bool = False) -> None:
    if world == 1:
        run_rank(0, 1, 0, recipe, results, interrupt)
        return
    torch.multiprocessing.start_processes(
        run_rank, args=(world, free_port(), recipe, results, interrupt), nprocs=world, start_method="spawn"
    )


def outcome(results: Path) -> dict[str, Any]:
    """What a run left: the method's record and final weights, the cached reference work, the evaluation samples."""
    experiment = results / "twin"
    [record_file] = experiment.glob("runs/expo_compositional-*/record.json")
    [samples_file] = experiment.glob("cache/reference-samples-*.pt")
    [logps_file] = experiment.glob("cache/reference-logps-*.pt")
    weights = load_file(record_file.parent / "weights.safetensors")
    evaluations = {
        path.relative_to(experiment / "runs").parts[0].split("-")[0] + "/" + path.parent.parent.name.split("-")[0]: [
            json.loads(line)["response"] for line in path.read_text().splitlines()
        ]
        for path in experiment.glob("runs/*/evaluation*/**/samples.jsonl")
    }
    return {
        "record": json.loads(record_file.read_text()),
        "weights": weights,
        "reference_samples": torch.load(samples_file, weights_only=True),
        "reference_logps": torch.load(logps_file, weights_only=True),
        "evaluations": evaluations,
        "metrics": {
            path.relative_to(experiment / "runs").parts[0].split("-")[0]: json.loads(path.read_text())
            for path in experiment.glob("runs/*/evaluation-*/metrics.json")
        },
        "slices": [json.loads(path.read_text()) for path in sorted(results.glob("slices-rank*.json"))],
        "summary": json.loads((experiment / "summary.json").read_text()),
    }


@pytest.fixture(scope="module")
def judge() -> Iterator[ChatServer]:
    with serving() as chat:
        yield chat


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, judge: ChatServer) -> dict[str, Any]:
    """One process with global batch 8, and 2 FSDP ranks with batches of 4, each with the judge requests it made."""
    found: dict[str, Any] = {}
    for name, world in (("one", 1), ("fsdp", 2)):
        results = tmp_path_factory.mktemp(name)
        before = len(judge.requests)
        on_ranks(world, twin(judge.base_url, world), results)
        found[name] = outcome(results) | {"results": results, "requests": judge.requests[before:]}
    return found


def assert_same_training(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert set(one["weights"]) == set(other["weights"])
    for name, tensor in one["weights"].items():
        torch.testing.assert_close(other["weights"][name], tensor, rtol=0, atol=2e-5, msg=name)
    moved = max(float((tensor - other["weights"][name]).abs().max()) for name, tensor in one["weights"].items())
    assert moved < 2e-5
    for stage in ("eval_before", "eval_after"):
        assert set(other["record"][stage]) == set(one["record"][stage])
        for key, value in one["record"][stage].items():
            assert other["record"][stage][key] == pytest.approx(value, abs=2e-5), (stage, key)
    assert other["record"]["steps"] == one["record"]["steps"] == 2 * 16 // GLOBAL_BATCH
    assert [step for step, _ in other["record"]["loss_history"]] == [step for step, _ in one["record"]["loss_history"]]
    assert [loss for _, loss in other["record"]["loss_history"]] == pytest.approx(
        [loss for _, loss in one["record"]["loss_history"]], abs=2e-5
    )
    # the norm before clipping: over the whole model on every rank, not over each rank's shard
    norms, norms_alone = (dict(run["record"]["grad_norm_history"]) for run in (other, one))
    assert list(norms) == list(norms_alone) == list(range(1, one["record"]["steps"] + 1))
    assert list(norms.values()) == pytest.approx(list(norms_alone.values()), rel=2e-5)
    assert min(norms.values()) > CLIP  # clipping scaled every step


def test_fsdp_on_two_cpu_ranks_trains_and_evaluates_like_one_process(runs: dict[str, Any]) -> None:
    one, fsdp = runs["one"], runs["fsdp"]
    assert_same_training(one, fsdp)
    sft, sft_alone = fsdp["summary"]["runs"][-1], one["summary"]["runs"][-1]
    assert sft["sft_val_nll_after"] == pytest.approx(sft_alone["sft_val_nll_after"], abs=1e-5)
    assert sft["sft_val_nll_after"] < sft["sft_val_nll_before"]  # SFT trained, the same on both
    # sharded sampling and scoring, gathered in order: the same samples and log-probs as one process draws
    assert fsdp["reference_samples"] == one["reference_samples"]
    torch.testing.assert_close(fsdp["reference_logps"]["pairs"], one["reference_logps"]["pairs"], rtol=1e-6, atol=1e-5)  # fp32
    assert fsdp["evaluations"] == one["evaluations"]
    assert set(fsdp["evaluations"]) == {"sft/evaluation", "expo_compositional/evaluation", "expo_compositional/step"}
    assert fsdp["record"]["eval_history"][0][0] == 2  # the periodic evaluation ran mid-training on both ranks
    # the same samples and verdicts; KL(π‖π_ref) is scored by the sharded model, equal to float32 round-off
    history, history_alone = fsdp["record"]["eval_history"], one["record"]["eval_history"]
    assert [step for step, _ in history] == [step for step, _ in history_alone]
    for (_, metrics), (_, metrics_alone) in zip(history, history_alone, strict=True):
        assert metrics == pytest.approx(metrics_alone, abs=1e-5, nan_ok=True)
    assert set(fsdp["metrics"]) == {"sft", "expo_compositional"}
    for run, metrics in one["metrics"].items():  # judged once, measured on all of it, not gathered twice
        assert fsdp["metrics"][run] == pytest.approx(metrics, abs=1e-5, nan_ok=True), run  # self-BLEU of 1 sample: NaN
        assert metrics["eval/n"] == 5


def test_each_sample_judge_request_and_tracked_run_happens_once(runs: dict[str, Any]) -> None:
    one, fsdp = runs["one"], runs["fsdp"]
    # every sampling slice was drawn by exactly one rank: the ranks' counts add up to one process's, and both worked
    total = Counter[str]()
    for part in fsdp["slices"]:
        total.update(part)
    assert len(fsdp["slices"]) == 2 and all(sum(part.values()) > 0 for part in fsdp["slices"])
    assert total == Counter(one["slices"][0])
    # one judge request per distinct comparison (5 prompts; the judge caches its verdicts), however many ranks
    prompts = [request["body"]["messages"][0]["content"] for request in fsdp["requests"]]
    assert len(prompts) == len(set(prompts)) == len(one["requests"]) >= 5
    # one MLflow run per policy, and one parent
    client = tracking.open_client(f"sqlite:///{fsdp['results'] / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "twin"]
    found = tracking.search_all(client, [experiment.experiment_id], "")
    keys = [run.data.tags.get(tracking.RUN_KEY) or run.data.tags[tracking.SWEEP_KEY] for run in found]
    assert len(keys) == len(set(keys)) == 3
    assert all(run.data.tags.get(tracking.COMPLETE) == "true" for run in found if tracking.RUN_KEY in run.data.tags)


@pytest.mark.slow  # two more 2-rank runs: about 4 minutes on 2 busy cores
def test_fsdp_run_resumes_from_its_checkpoint(runs: dict[str, Any], judge: ChatServer, tmp_path: Path) -> None:
    recipe = twin(judge.base_url, 2)
    on_ranks(2, recipe, tmp_path, interrupt=True)
    [run_dir] = (tmp_path / "twin" / "runs").glob("expo_compositional-*")
    assert (run_dir / "last.ckpt").exists() and not (run_dir / "record.json").exists()
    on_ranks(2, recipe, tmp_path)
    resumed = outcome(tmp_path)
    assert_same_training(runs["fsdp"], resumed)
    assert resumed["evaluations"] == runs["fsdp"]["evaluations"]


@pytest.mark.slow  # two more processes, each importing the stack: about 3 minutes on 2 busy cores
def test_two_nodes_of_one_process_match_one_node_of_two(runs: dict[str, Any], judge: ChatServer, tmp_path: Path) -> None:
    """Two `expo-bench run` commands, as on two machines: each names its node rank and the first node's address."""
    recipe_path = tmp_path / "twin.yaml"
    recipe_path.write_text(yaml.safe_dump(twin(judge.base_url, devices=1, num_nodes=2)))
    port = free_port()
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "expo_bench", "run", str(recipe_path), "--results", str(tmp_path / "results")]
    nodes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env={**environment, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "finished in" in logs[0] and "finished in" not in logs[1]  # the second node's rank is quiet
    two_nodes = outcome(tmp_path / "results")
    assert_same_training(runs["fsdp"], two_nodes)
    assert two_nodes["reference_samples"] == runs["fsdp"]["reference_samples"]
    assert two_nodes["evaluations"] == runs["fsdp"]["evaluations"]
