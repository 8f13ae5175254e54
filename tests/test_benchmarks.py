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
