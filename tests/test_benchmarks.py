"""The GPU step benchmark's code path, smoke-tested on the CPU with a tiny model: one JSON line, three contenders."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu_step_benchmark_runs_its_three_contenders_on_a_tiny_model() -> None:
    command = [sys.executable, "benchmarks/gpu_step.py", "--model", "tiny", "--steps", "1", "--warmup", "1", "--length", "48"]
    finished = subprocess.run([*command, "--pairs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    [line] = finished.stdout.splitlines()  # stdout is one JSON line
    result = json.loads(line)
    contenders = result["models"]["tiny"]["contenders"]
    assert set(contenders) == {"harness", "bare", "trl"}
    for name, measured in contenders.items():
        assert "error" not in measured, (name, measured)
        assert measured["step_s"] > 0 and measured["tokens_per_s"] > 0
        assert measured["losses"][0] == round(math.log(2), 6)  # policy = reference at the first step, for everyone
    assert result["models"]["tiny"]["max_loss_difference"] < 1e-5  # the same batches, the same updates


def test_gpu_check_autocast_probe_on_the_cpu() -> None:
    """FSDP on one CPU process with the headline recipe's settings: bf16 autocast is on in the step (Lightning's own FSDP
    precision autocasts on CUDA only), the master weights stay float32, and clipping sees the whole gradient norm."""
    command = [sys.executable, "benchmarks/gpu_check.py", "--checks", "autocast", "--accelerator", "cpu"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    probe = json.loads(finished.stdout.splitlines()[-1])["autocast"]
    assert "error" not in probe, probe
    assert probe["strategy_class"] == "FSDPOnCPU" and probe["precision"] == "bf16-mixed" and probe["steps"] == 2
    assert probe["autocast_on"] and probe["matmul_dtype"] == "torch.bfloat16"
    assert probe["master_dtype"] == ["torch.float32"]
    assert probe["grad_norm_before_clipping"] > probe["gradient_clip_val"]
