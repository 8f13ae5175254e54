"""One DPO training step at Pythia scale on one GPU: this harness (its DPO LightningModule through ``build_trainer``),
a bare PyTorch loop and TRL's ``DPOTrainer``, on the same batches, from the same random weights.

Pythia-410M, 1.4B and 2.8B are built from their architecture constants (no hub) with random weights: fp32 master
weights, bf16 autocast (``bf16-mixed``), AdamW, β 0.1, the frozen reference run on every step (no cached log-probs),
batches of ``--pairs`` random-token pairs (prompt up to ``--length``/2, responses up to the rest). For each
contender it prints step time, tokens/s (real, unpadded tokens), peak GPU memory and model-FLOPs utilisation:
(6·N·tokens for the policy's forward and backward + 2·N·tokens for the reference's forward) / step time / the GPU's
peak dense bf16 FLOP/s, with N the parameter count. One JSON line on stdout; progress on stderr.

    python benchmarks/gpu_step.py                                  # the three sizes, defaults: a few minutes on one GPU
    python benchmarks/gpu_step.py --model tiny --steps 1 --warmup 1  # CPU smoke test of the same code (fp32)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

VOCAB = 50304
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # EleutherAI's Pythia suite (Biderman et al., 2023, Table 1), GPT-NeoX with parallel residuals, rotary on 25%
    "pythia-410m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "pythia-1.4b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16},
    "pythia-2.8b": {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},  # the CPU smoke test
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}
"""Dense bf16 tensor-core peak by GPU name fragment (NVIDIA data sheets, SXM where there are variants)."""
CONTENDERS = ("harness", "bare", "trl")


@dataclass
class Measured:
    """One contender on one model: times at the end of every step, losses, peak memory."""

    stamps: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_memory_gib: float | None = None


@dataclass(frozen=True)
class Work:
    model: str
    pairs: list[tuple[list[int], list[int], list[int]]]
    """(prompt, chosen, rejected) token ids, in the order every contender trains on them."""
    pairs_per_step: int
    steps: int
    warmup: int
    device: torch.device
    length: int
    lr: float = 1e-6
    beta: float = 0.1

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda"

    def batch(self, step: int) -> list[tuple[list[int], list[int], list[int]]]:
        return self.pairs[step * self.pairs_per_step : (step + 1) * self.pairs_per_step]


def build_policy(work: Work, seed: int = 0) -> Any:
    """The model with random weights from ``seed``, built on its device, fp32 master weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    shape = ARCHITECTURES[work.model]
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        intermediate_size=4 * shape["hidden_size"],
        rotary_pct=0.25,
        max_position_embeddings=2048,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attn_implementation="sdpa",
        **shape,
    )
    torch.manual_seed(seed)
    with work.device:
        return GPTNeoXForCausalLM(config).float()


def random_pairs(count: int, length: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Pairs of random tokens with a spread of prompt and response lengths, like HH's (EOS-free: nothing is sampled)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        size = int(torch.randint(low, high + 1, (), generator=generator))
        return torch.randint(1, VOCAB, (size,), generator=generator).tolist()

    half = length // 2
    return [(tokens(half // 4, half), tokens(8, length - half), tokens(8, length - half)) for _ in range(count)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_harness(work: Work, measured: Measured) -> None:
    """``expo_bench``'s DPO module, data module and Trainer (bf16-mixed), the reference a frozen copy."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from expo_bench.lm.data import PairData, PairDataset
    from expo_bench.lm.model import CausalLMScorer
    from expo_bench.lm.tokenize import TokenizedPair
    from expo_bench.methods.dpo import DPO, DPOParams
    from expo_bench.optim import OptimizerConfig
    from expo_bench.train_config import TrainConfig
    from expo_bench.trainer import build_trainer

    policy = build_policy(work)
    optimizer = OptimizerConfig(name="AdamW", lr=work.lr, kwargs={"weight_decay": 0.0})
    module = DPO(CausalLMScorer(policy), CausalLMScorer(copy.deepcopy(policy)), [DPOParams(beta=work.beta)], optimizer)
    pairs = [TokenizedPair(prompt, chosen, rejected, False, False) for prompt, chosen, rejected in work.pairs]
    dataset = PairDataset(pairs, pad_token_id=0)
    data = PairData(dataset, PairDataset(pairs[: work.pairs_per_step], 0), work.pairs_per_step, seed=0)
    train = TrainConfig(
        max_steps=work.total_steps,
        batch_size=work.pairs_per_step,
        optimizer=optimizer,
        precision="bf16-mixed" if work.bf16 else "32-true",
        accelerator="gpu" if work.device.type == "cuda" else "cpu",
        devices=1,
        deterministic=False,
        log_every_n_steps=work.total_steps + 1,
    )

    class Clock(Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            synchronize(work.device)
            measured.stamps.append(time.perf_counter())
            measured.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    trainer = build_trainer(train, [Clock()], enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)


def harness_order(work: Work) -> list[tuple[list[int], list[int], list[int]]]:
    """The pairs in the order the harness's seeded sampler trains on them (so every contender sees its batches)."""
    from expo_bench.lm.data import EpochSeededSampler

    return [work.pairs[index] for index in EpochSeededSampler(len(work.pairs), seed=0).order()]


def run_bare(work: Work, measured: Measured) -> None:
    """A plain loop: chosen and rejected in one forward, a float32 log-softmax, -logsigmoid(β h), AdamW."""
    from bare_dpo import dpo_step

    from expo_bench.contracts import concat_sequences
    from expo_bench.lm.tokenize import TokenizedPair, collate_pairs

    policy = build_policy(work).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=work.lr, weight_decay=0.0)

    ordered = harness_order(work)
    for step in range(work.total_steps):
        pairs = [
            TokenizedPair(*pair, False, False) for pair in ordered[step * work.pairs_per_step : (step + 1) * work.pairs_per_step]
        ]
        batch = collate_pairs(pairs, 0)
        both = {key: value.to(work.device) for key, value in concat_sequences(batch.chosen, batch.rejected).items()}
        loss = dpo_step(policy, reference, both, work.beta, optimizer, work.bf16)
        synchronize(work.device)
        measured.stamps.append(time.perf_counter())
        measured.losses.append(loss)


def run_trl(work: Work, measured: Measured) -> None:
    """TRL's ``DPOTrainer`` (sigmoid loss, bf16 autocast over fp32 weights), fed the same token ids in the same order."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    # the batches are token ids already: DPOTrainer only needs a tokenizer for its pad token
    vocabulary = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>", eos_token="<pad>")
    policy = build_policy(work)
    reference = copy.deepcopy(policy)
    ordered = harness_order(work)[: work.total_steps * work.pairs_per_step]
    columns = {name: [pair[i] for pair in ordered] for i, name in enumerate(("prompt_ids", "chosen_ids", "rejected_ids"))}

    class Timed(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # already the token-id columns TRL's collator reads

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            measured.losses.append(float((output[0] if return_outputs else output).detach()))
            return output

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize(work.device)
            measured.stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir,
            use_cpu=work.device.type != "cuda",
            report_to="none",
            per_device_train_batch_size=work.pairs_per_step,
            max_steps=work.total_steps,
            learning_rate=work.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=0.0,
            optim="adamw_torch",
            beta=work.beta,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
            max_length=work.length,
            train_sampling_strategy="sequential",
            gradient_checkpointing=False,
            bf16=work.bf16,
            fp16=False,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Timed(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=Dataset.from_dict(columns),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        trainer.train()


RUNNERS: dict[str, Callable[[Work, Measured], None]] = {"harness": run_harness, "bare": run_bare, "trl": run_trl}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS.items() if fragment in name), None)


def measure(work: Work, contender: str, peak: float | None, parameters: int) -> dict[str, Any]:
    measured = Measured()
    gc.collect()
    if work.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(work.device)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON line alone (TRL prints its metrics)
            RUNNERS[contender](work, measured)
    except Exception as error:  # one contender failing must not hide the others' figures
        return {"error": f"{type(error).__name__}: {error}"[:500]}
    if work.device.type == "cuda":
        measured.peak_memory_gib = round(torch.cuda.max_memory_allocated(work.device) / 2**30, 2)
    timed = measured.stamps[work.warmup - 1 :]
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
    ordered = harness_order(work)
    real_tokens = (
        sum(
            len(prompt) * 2 + len(chosen) + len(rejected)
            for prompt, chosen, rejected in ordered[: work.total_steps * work.pairs_per_step]
        )
        / work.total_steps
    )
    flops = (6 + 2) * parameters * real_tokens  # policy forward + backward, reference forward
    return {
        "step_s": round(step_s, 4),
        "tokens_per_s": round(real_tokens / step_s, 1),
        "peak_memory_gib": measured.peak_memory_gib,
        "mfu": None if peak is None else round(flops / step_s / (peak * 1e12), 4),
        "losses": [round(loss, 6) for loss in measured.losses],
        "seconds_with_setup": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=list(ARCHITECTURES), default=["pythia-410m", "pythia-1.4b", "pythia-2.8b"])
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (the DPO paper: 8 per GPU × 8 GPUs)")
    parser.add_argument("--length", type=int, default=512, help="max tokens of prompt + response (the DPO paper's 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="steps first, left out of the timing")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's peak dense bf16 TFLOP/s")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_tflops(device, args.peak_tflops)
    started = time.perf_counter()
    from importlib.metadata import version

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak,
        "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
        "pairs_per_step": args.pairs,
        "max_length": args.length,
        "steps": args.steps,
        "warmup": args.warmup,
        "versions": {name: version(name) for name in ("torch", "lightning", "transformers", "trl")},
        "models": {},
    }
    for model in args.model:
        count = (args.warmup + args.steps) * args.pairs
        work = Work(model, random_pairs(count, args.length, seed=0), args.pairs, args.steps, args.warmup, device, args.length)
        parameters = sum(parameter.numel() for parameter in build_policy(work).parameters())
        gc.collect()
        entry: dict[str, Any] = {"parameters": parameters, "contenders": {}}
        for contender in args.only:
            print(f"{model}: {contender} ...", file=sys.stderr, flush=True)
            entry["contenders"][contender] = measure(work, contender, peak, parameters)
        losses = [c["losses"] for c in entry["contenders"].values() if "losses" in c]
        if len(losses) > 1:
            entry["max_loss_difference"] = max(max(values) - min(values) for values in zip(*losses, strict=False))
        result["models"][model] = entry
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
