"""Recipes checked against the machine that would run them: what cannot run here is refused with the field named,
before any work; recipes meant for another machine validate with ``--any-machine``; DeepSpeed's strategy and config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import needs_shared_data
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from expo_bench.cli import main
from expo_bench.errors import RecipeError
from expo_bench.recipe import load_recipe, validate_recipe
from expo_bench.train_config import Machine, TrainConfig
from expo_bench.trainer import STRATEGIES, FSDPOnCPU

ROOT = Path(__file__).parent.parent
PYTHIA = ROOT / "recipes" / "hh_pythia28.yaml"
CPU_ONLY = Machine(gpus=0, bf16=False, cpus=2, packages=frozenset({"deepspeed"}))
EIGHT_GPUS = Machine(gpus=8, bf16=True, cpus=64, packages=frozenset({"deepspeed"}))
BARE_GPUS = Machine(gpus=8, bf16=True, cpus=64, packages=frozenset())
OLD_GPUS = Machine(gpus=8, bf16=False, cpus=64, packages=frozenset())


def problems(overrides: list[str], machine: Machine, recipe: Path = PYTHIA) -> list[tuple[str, str]]:
    try:
        load_recipe(recipe, overrides).check_machine(machine)
    except RecipeError as error:
        return error.problems
    return []


def fields(found: list[tuple[str, str]]) -> list[str]:
    return [path for path, _ in found]


def test_the_gpu_recipe_fits_eight_gpus_and_is_refused_without_them() -> None:
    assert problems([], EIGHT_GPUS) == []
    found = problems([], CPU_ONLY)
    assert fields(found) == ["train.accelerator", "task.sft.accelerator"]  # methods inherit train's: named once
    assert "needs a CUDA GPU" in found[0][1]


@pytest.mark.parametrize(
    ("overrides", "machine", "field", "says"),
    [
        (["train.devices=16", "task.sft.devices=16"], EIGHT_GPUS, "train.devices", "16 asked, this machine has 8 GPUs"),
        (["train.strategy=deepspeed_stage_2"], BARE_GPUS, "train.strategy", 'pip install -e ".[deepspeed]"'),
        (["train.precision=bf16-true"], OLD_GPUS, "train.precision", "no bfloat16 support"),
        (["task.model.attn_implementation=flash_attention_2"], EIGHT_GPUS, "task.model.attn_implementation", "flash-attn"),
    ],
)
def test_what_this_machine_cannot_run_is_refused_by_field(overrides: list[str], machine: Machine, field: str, says: str) -> None:
    found = problems(overrides, machine)
    assert field in fields(found), found
    assert says in dict(found)[field]


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["train.strategy=deepspeed_stage_3"], "train.strategy", "CUDA GPUs only"),
        (["train.precision=16-mixed"], "train.precision", "needs a GPU"),
        (["train.devices=3"], "train.devices", "3 asked, this machine has 2 CPU cores"),
    ],
)
@needs_shared_data()
def test_the_cpu_twin_refuses_what_cpus_cannot_do(overrides: list[str], field: str, says: str) -> None:
    found = problems(overrides, CPU_ONLY, ROOT / "recipes" / "hh_tiny_local.yaml")
    assert field in fields(found), found
    assert says in dict(found)[field]


@needs_shared_data()
def test_fsdp_on_cpu_ranks_is_accepted_and_built_as_cpu_fsdp() -> None:
    overrides = ["train.strategy=fsdp", "train.devices=2"]
    assert problems(overrides, CPU_ONLY, ROOT / "recipes" / "hh_tiny_local.yaml") == []
    train = TrainConfig(accelerator="cpu", devices=2, strategy="fsdp")
    strategy = STRATEGIES["fsdp"](train, set(), CPU_ONLY)
    assert isinstance(strategy, FSDPOnCPU) and strategy.kwargs["use_orig_params"]
    assert type(STRATEGIES["fsdp"](train.model_copy(update={"accelerator": "gpu"}), set(), EIGHT_GPUS)) is FSDPStrategy


@pytest.mark.parametrize("recipe", ["synthetic_interpolation.yaml", "synthetic_preservation.yaml"])
def test_a_tabular_task_refuses_hardware_settings_it_would_ignore(recipe: str) -> None:
    """It trains in one CPU process: a strategy, devices or nodes are refused by field, not silently dropped."""
    found = problems(["train.strategy=fsdp", "train.devices=2", "train.num_nodes=2"], CPU_ONLY, ROOT / "recipes" / recipe)
    assert fields(found) == ["train.devices", "train.num_nodes", "train.strategy"]
    assert "trains in one CPU process" in dict(found)["train.strategy"]
    assert problems([], CPU_ONLY, ROOT / "recipes" / recipe) == []


def test_clipping_with_a_fused_optimizer_under_fp16_is_refused() -> None:
    """The fused step unscales fp16 gradients itself: clipping before it would clip scaled gradients (Lightning refuses
    it in its own clipping, which the harness's FSDP-aware clipping replaces)."""
    fused = "train.optimizer={name: AdamW, lr: 1.0e-6, kwargs: {fused: true}}"
    overrides = ["train.precision=16-mixed", fused, "train.gradient_clip_val=1.0"]
    with pytest.raises(RecipeError) as caught:
        load_recipe(PYTHIA, overrides)
    [(field, message)] = caught.value.problems
    assert field == "train" and "fused" in message and "16-mixed" in message
    assert problems([*overrides[:2], "train.gradient_clip_val=null", "task.sft.precision=16-mixed"], EIGHT_GPUS) == []


def test_every_stage_trains_in_one_world_and_keeps_fp32_masters_under_mixed_precision() -> None:
    data: dict[str, Any] = yaml.safe_load(PYTHIA.read_text())
    data["task"]["sft"]["devices"] = 4
    data["task"]["model"]["dtype"] = "bfloat16"
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data, PYTHIA)
    assert fields(caught.value.problems) == ["task.sft.devices", "task.model.dtype"]
    # an SFT stage that names no hardware trains on the recipe's
    del data["task"]["sft"]["devices"], data["task"]["sft"]["accelerator"], data["task"]["model"]["dtype"]
    experiment = validate_recipe(data, PYTHIA)
    assert experiment.recipe.task.sft.devices == 8 and experiment.world.devices == 8  # type: ignore[union-attr]


def test_cli_refuses_before_any_work_and_validates_for_another_machine(tmp_path: Path, capsys: Any) -> None:
    assert main(["run", str(PYTHIA), "--results", str(tmp_path)]) == 2
    assert "train.accelerator: 'gpu' needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["validate", str(PYTHIA)]) == 2
    capsys.readouterr()
    assert main(["validate", str(PYTHIA), "--any-machine"]) == 0
    assert "hh_pythia28.yaml: valid" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason='needs pip install -e ".[deepspeed]"')
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_recipes_validate_and_build_their_strategy(stage: int) -> None:
    """Lightning refuses DeepSpeed on CPU, so this checks what the harness hands it on a GPU machine."""
    overrides = [f"train.strategy=deepspeed_stage_{stage}", f"task.sft.strategy=deepspeed_stage_{stage}"]
    assert problems(overrides, EIGHT_GPUS) == []
    experiment = load_recipe(PYTHIA, overrides)
    strategy = STRATEGIES[experiment.recipe.train.strategy](experiment.recipe.train, set(), EIGHT_GPUS)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy.config["zero_optimization"]["contiguous_gradients"] is True
