"""Peak memory of per-token log-probs, side by side in one run: the harness's chunked ``token_logps`` against the full
float32 log-softmax it replaced (``-cross_entropy(logits.float())``), on a Pythia-410M-sized GPT-NeoX built from its
architecture constants (random weights, no hub).

Two measurements per logits dtype: the log-prob function alone on logits of the model's output shape (forward and
backward), and a whole policy step (model forward, log-probs, backward). Memory is the peak above the level before the
measured step: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set size (Linux's VmHWM,
reset through ``/proc/self/clear_refs``). Prints one JSON line with the figures and the ratios.

    python benchmarks/logps_memory.py [--rows 4] [--length 256] [--no-step]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expo_bench.lm.model import token_logps

PYTHIA_410M = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
               "vocab_size": 50304, "rotary_pct": 0.25, "max_position_embeddings": 2048}  # fmt: skip


def full_log_softmax(logits: Tensor, targets: Tensor) -> Tensor:
    """The harness's log-probs before: cross-entropy over a float32 copy of the whole logits."""
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


IMPLEMENTATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"full_fp32": full_log_softmax, "chunked": token_logps}


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_above_start(device: torch.device, work: Callable[[], Any]) -> float:
    """MiB that ``work()`` needed at its peak, above what was allocated when it started."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = resident_kib("VmRSS")
    work()
    return (resident_kib("VmHWM") - start) / 1024


def function_alone(name: str, logits: Tensor, targets: Tensor, mask: Tensor) -> None:
    leaf = logits.detach().requires_grad_()
    (IMPLEMENTATIONS[name](leaf, targets) * mask).sum().backward()


def policy_step(name: str, model: Any, input_ids: Tensor, mask: Tensor) -> None:
    logits = model(input_ids=input_ids).logits[:, :-1]
    (IMPLEMENTATIONS[name](logits, input_ids[:, 1:]) * mask).sum().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc then maps every allocation of 64 KiB or more on its own and unmaps it when freed, so the resident set
        # follows the live tensors instead of keeping freed memory in its heap (the CPU measurement relies on it)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="sequences per step (a DPO batch of b pairs has 2b)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--no-step", action="store_true", help="skip the whole-model step (the slow part on a CPU)")
    args = parser.parse_args()
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = PYTHIA_410M["vocab_size"]
    input_ids = torch.randint(0, vocab, (args.rows, args.length), device=device)
    targets, mask = input_ids[:, 1:], torch.ones(args.rows, args.length - 1, device=device)
    result: dict[str, Any] = {"device": str(device), "rows": args.rows, "length": args.length, "vocab": vocab}
    started = time.perf_counter()
    for dtype in (torch.float32, torch.bfloat16):
        key = str(dtype).removeprefix("torch.")
        logits = torch.randn(args.rows, args.length - 1, vocab, device=device, dtype=dtype)
        truth = -F.cross_entropy(logits.double().transpose(1, 2), targets, reduction="none")
        for name, implementation in IMPLEMENTATIONS.items():  # in fp32 on these logits, against float64
            error = (implementation(logits.float(), targets).double() - truth).abs().max()
            result[f"max_abs_error_{key}_logits_{name}"] = float(error)
            peak = peak_above_start(device, partial(function_alone, name, logits, targets, mask))
            result[f"function_mib_{key}_{name}"] = round(peak, 1)
        result[f"function_ratio_{key}"] = round(
            result[f"function_mib_{key}_chunked"] / result[f"function_mib_{key}_full_fp32"], 3
        )
        del logits, truth
    if not args.no_step:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_410M, attention_dropout=0.0, hidden_dropout=0.0)).to(device)
        result["parameters"] = sum(parameter.numel() for parameter in model.parameters())
        for name in IMPLEMENTATIONS:
            step = partial(policy_step, name, model, input_ids, mask)
            step()  # warm up: allocator caches, lazy initialisation
            result[f"step_mib_float32_{name}"] = round(peak_above_start(device, step), 1)
        result["step_ratio_float32"] = round(result["step_mib_float32_chunked"] / result["step_mib_float32_full_fp32"], 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
