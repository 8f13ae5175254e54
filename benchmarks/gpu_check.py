"""The GPU check, one command on one CUDA GPU (an H100/H200 takes about 6 minutes); one JSON summary on stdout.

1. ``autocast``: the harness's own Trainer (``build_trainer``) with the headline recipe's training settings (FSDP,
   bf16-mixed, its clipping), on one GPU, trains a probe for two steps that records whether bf16 autocast is on inside
   the step, the dtype a matmul gives there, the weights' dtype inside the step (FSDP's bf16 copies) and outside it
   (the float32 master shards) and the gradient norm before clipping.
2. ``gpu_step``: ``benchmarks/gpu_step.py`` on Pythia-410M and 1.4B (harness vs bare loop vs TRL; its own JSON).
3. ``rehearsal``: ``recipes/hh_pythia28.yaml`` rehearsed on the GPU exactly as tests/test_rehearsals.py does on CPU
   ranks (tiny model, local data, the stand-in judge, small sizes; strategy, precision, optimizer, warmup, clipping,
   methods and temperatures from the file), with FlashAttention-2 where ``flash_attn`` is installed.

    python benchmarks/gpu_check.py                      # needs the shared data (HH test splits, tokenizers)
    python benchmarks/gpu_check.py --data path/to/data  # where that data is, e.g. copied into the checkout
    python benchmarks/gpu_check.py --checks autocast --accelerator cpu   # the probe on the CPU (FSDP on one process)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def autocast_probe(accelerator: str) -> dict[str, Any]:
    import lightning as L

    from expo_bench.optim import clip_gradient_norm
    from expo_bench.train_config import TrainConfig
    from expo_bench.trainer import build_trainer

    headline = yaml.safe_load((ROOT / "recipes" / "hh_pythia28.yaml").read_text())["train"]
    settings = {key: headline[key] for key in ("precision", "strategy", "gradient_clip_val", "optimizer")}
    seen: dict[str, Any] = {}
    device = "cuda" if accelerator == "gpu" else accelerator

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, 64)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            out = self.layer(batch)
            seen.update(autocast_on=torch.is_autocast_enabled(device), matmul_dtype=str(out.dtype))
            seen["weights_dtype_in_step"] = str(self.layer.weight.dtype)
            return out.float().pow(2).mean() * 1e4  # large gradients: clipping is active

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def configure_gradient_clipping(
            self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
        ) -> None:
            seen["grad_norm_before_clipping"] = float(
                clip_gradient_norm(self.trainer.strategy.model, optimizer, gradient_clip_val)
            )

    config = TrainConfig.model_validate(settings | {"accelerator": accelerator, "devices": 1, "max_steps": 2})
    trainer = build_trainer(config, [], enable_progress_bar=False)
    trainer.fit(Probe(), torch.utils.data.DataLoader(torch.randn(8, 64), batch_size=4))
    assert trainer.strategy.model is not None
    master = {str(parameter.dtype) for parameter in trainer.strategy.model.parameters()}
    return (
        settings
        | seen
        | {"master_dtype": sorted(master), "strategy_class": type(trainer.strategy).__name__, "steps": trainer.global_step}
    )


def gpu_step() -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--model", "pythia-410m", "pythia-1.4b"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=420)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return {"returncode": result.returncode, "result": json.loads(lines[-1]) if lines else None, "stderr": result.stderr[-2000:]}


def headline_rehearsal(data: Path) -> dict[str, Any]:
    from chat_server import serving
    from rehearsal import STAND_IN_KEY, load, rehearsal, tiny_classifier

    recipe = load(ROOT / "recipes" / "hh_pythia28.yaml")
    judge = recipe["task"]["evaluation"]["judge"]
    flash = importlib.util.find_spec("flash_attn") is not None
    with tempfile.TemporaryDirectory() as scratch, serving(models=(judge["model"],)) as chat:
        workdir = Path(scratch)
        rehearsed = rehearsal(recipe, chat.base_url, tiny_classifier(workdir / "classifier", data), "gpu", 1, data)
        if flash:
            rehearsed["task"]["model"]["attn_implementation"] = "flash_attention_2"
        (workdir / "recipe.yaml").write_text(yaml.safe_dump(rehearsed, sort_keys=False))
        started = time.perf_counter()
        command = [sys.executable, "-m", "expo_bench", "run", "recipe.yaml", "--results", "results"]
        environment = {**os.environ, "PYTHONPATH": str(ROOT), judge["api_key_env"]: STAND_IN_KEY}
        result = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=420)
        table = workdir / "results" / rehearsed["experiment"] / "leaderboard.csv"
        rows = table.read_text().splitlines()[1:] if table.exists() else []
        return {
            "returncode": result.returncode,
            "seconds": round(time.perf_counter() - started, 1),
            "flash_attention_2": flash,
            "leaderboard_methods": sorted(row.split(",")[0] for row in rows),
            "judge_requests": len(chat.requests),
            "output_tail": (result.stdout + result.stderr)[-3000:],
        }


CHECKS = ("autocast", "gpu_step", "rehearsal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="HH test splits and tokenizers")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu", help="cpu: the autocast probe's CPU smoke test")
    options = parser.parse_args()
    if options.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU (--accelerator cpu runs the autocast probe on the CPU)")
    checks = {
        "autocast": lambda: autocast_probe(options.accelerator),
        "gpu_step": gpu_step,
        "rehearsal": lambda: headline_rehearsal(options.data),
    }
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name() if options.accelerator == "gpu" else "cpu"}
    summary["torch"] = torch.__version__
    for name in options.checks:
        started = time.perf_counter()
        try:
            summary[name] = checks[name]()
        except Exception as error:  # one check failing must not hide the others' results
            summary[name] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
