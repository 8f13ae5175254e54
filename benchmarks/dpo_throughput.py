"""DPO training throughput: this harness vs TRL's ``DPOTrainer`` vs a bare PyTorch loop, side by side.

All three train the same tiny GPT-NeoX (one set of initial weights, saved once by the parent and loaded by each) with
DPO on the same batches of real Anthropic HH pairs (helpful-base test split, the harness's tokenization and its seeded
batch order), in fp32 on the CPU, with the frozen reference model run on every step. Each contender runs in a fresh
subprocess so that its peak RSS is its own; only the steady-state steps after the warmup steps are timed.

    python benchmarks/dpo_throughput.py [--steps 20] [--batch-size 8] [--hidden-size 128]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CONTENDERS = ("harness", "trl", "bare")
THREADS = 2


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a contender needs to rebuild the identical model and batches in its own process."""

    steps: int
    warmup: int
    batch_size: int
    hidden_size: int
    layers: int
    heads: int
    max_length: int
    max_prompt_length: int
    beta: float
    lr: float
    seed: int
    data: str
    tokenizer: str
    weights: str
    trl_data: str
    profile: bool = False

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


@dataclasses.dataclass
class Result:
    """What one contender measured: the end time and loss of every step, memory, and provenance."""

    contender: str
    stamps: list[float]
    losses: list[float]
    batch_digests: list[str]
    peak_rss_mb: float
    setup_rss_mb: float
    threads: int
    parameters: int
    weights_fingerprint: str
    note: str = ""

    def seconds_per_step(self, warmup: int) -> float:
        """Mean over the timed steps: from the end of the last warmup step to the end of the last step."""
        return (self.stamps[-1] - self.stamps[warmup - 1]) / (len(self.stamps) - warmup)

    def best_step(self, warmup: int) -> float:
        """The fastest timed step: the least disturbed by other processes on a shared machine."""
        return min(later - earlier for earlier, later in zip(self.stamps[warmup - 1 :], self.stamps[warmup:], strict=False))


@dataclasses.dataclass
class Data:
    """Tokenized pairs, their texts, and the order (lists of indices) in which the harness's loader batches them."""

    pairs: list[Any]
    prompts: list[Any]
    batches: list[list[int]]
    pad_token_id: int

    @property
    def ordered(self) -> list[Any]:
        return [self.pairs[index] for batch in self.batches for index in batch]

    @property
    def ordered_prompts(self) -> list[Any]:
        return [self.prompts[index] for batch in self.batches for index in batch]


# -- shared by every contender ----------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far; Linux reports ``ru_maxrss`` in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_config(setup: Setup, vocab_size: int) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=setup.hidden_size,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        intermediate_size=4 * setup.hidden_size,
        max_position_embeddings=2 * setup.max_length,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def load_tokenizer(setup: Setup) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(setup.tokenizer)


def build_model(setup: Setup, vocab_size: int) -> Any:
    """The shared initial weights: built from the config, then overwritten by the state dict the parent saved once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config(setup, vocab_size))
    model.load_state_dict(torch.load(setup.weights, weights_only=True), strict=True)
    return model


def prepare_data(setup: Setup, tokenizer: Any) -> Data:
    """The first ``total_steps * batch_size`` HH pairs, tokenized by the harness, with the harness's seeded batch order."""
    from expo_bench.lm.data import PairData, PairDataset
    from expo_bench.lm.hh import load_hh_pairs
    from expo_bench.lm.tokenize import TokenizationConfig, tokenize_pair

    prompts, _ = load_hh_pairs(setup.data, "helpful-base", "test")
    prompts = prompts[: setup.total_steps * setup.batch_size]
    config = TokenizationConfig(max_length=setup.max_length, max_prompt_length=setup.max_prompt_length)
    pairs = [tokenize_pair(tokenizer, prompt, config) for prompt in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The harness's own training loader, read as the batches of indices it deals (its order depends on the seed alone)
    dataset = PairDataset(pairs, pad)
    batches = [list(batch) for batch in PairData(dataset, dataset, setup.batch_size, setup.seed).train_dataloader().batch_sampler]
    return Data(pairs, prompts, batches, pad)


def batch_digest(input_ids: Tensor, attention_mask: Tensor) -> str:
    """Short hash of a batch's real tokens in row order, blind to padding side, pad id and padded length."""
    return hashlib.sha1(input_ids.masked_select(attention_mask.bool()).numpy().tobytes()).hexdigest()[:10]


def token_counts(data: Data, batch_size: int) -> tuple[float, float]:
    """Mean real and padded tokens per batch, chosen and rejected rows together."""
    ordered = data.ordered
    real, padded = [], []
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        lengths = [len(pair.prompt_ids) + len(response) for pair in batch for response in (pair.chosen_ids, pair.rejected_ids)]
        real.append(sum(lengths))
        padded.append(len(lengths) * max(lengths))
    return sum(real) / len(real), sum(padded) / len(padded)


def weights_fingerprint(model: torch.nn.Module) -> str:
    from expo_bench.lm.data import fingerprint_module

    return fingerprint_module(model)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# -- the contenders -----------------------------------------------------------------------------------------------------


def run_harness(setup: Setup) -> Result:
    """``expo_bench``'s DPO LightningModule, data module and Trainer, reference run on every batch (no cached logps)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from expo_bench.contracts import concat_sequences
    from expo_bench.lm.data import PairData, PairDataset
    from expo_bench.lm.model import CausalLMScorer
    from expo_bench.methods.dpo import DPO, DPOParams
    from expo_bench.optim import OptimizerConfig
    from expo_bench.train_config import TrainConfig
    from expo_bench.trainer import build_trainer

    tokenizer = load_tokenizer(setup)
    data = prepare_data(setup, tokenizer)
    model = build_model(setup, len(tokenizer))
    fingerprint = weights_fingerprint(model)
    L.seed_everything(setup.seed, verbose=False)
    optimizer = OptimizerConfig(name="AdamW", lr=setup.lr, kwargs={"weight_decay": 0.0})
    train = TrainConfig(
        max_steps=setup.total_steps, batch_size=setup.batch_size, optimizer=optimizer, accelerator="cpu", devices=1
    )
    module = DPO(CausalLMScorer(model), CausalLMScorer(copy.deepcopy(model)), [DPOParams(beta=setup.beta)], optimizer)
    train_set = PairDataset(data.pairs, data.pad_token_id)
    datamodule = PairData(train_set, PairDataset(data.pairs[: setup.batch_size], data.pad_token_id), setup.batch_size, setup.seed)
    stamps: list[float] = []
    losses: list[float] = []
    digests: list[str] = []

    class StepRecorder(Callback):
        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            both = concat_sequences(batch.chosen, batch.rejected)
            digests.append(batch_digest(both["input_ids"], both["attention_mask"]))
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            stamps.append(time.perf_counter())

    profiler = None
    if setup.profile:  # where a step's time goes, by Lightning hook (its overhead is part of what is timed)
        from lightning.pytorch.profilers import SimpleProfiler

        profiler = SimpleProfiler(dirpath=Path(setup.weights).parent, filename="harness-profile")
    trainer = build_trainer(
        train, [StepRecorder()], enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, profiler=profiler
    )
    setup_rss = peak_rss_mb()
    trainer.fit(module, datamodule=datamodule)
    note = ""
    if profiler is not None:
        note = "\n".join(path.read_text() for path in Path(setup.weights).parent.glob("*harness-profile*"))
    return Result(
        "harness",
        stamps,
        losses,
        digests,
        peak_rss_mb(),
        setup_rss,
        torch.get_num_threads(),
        parameter_count(model),
        fingerprint,
        note,
    )


def run_trl(setup: Setup) -> Result:
    """TRL's ``DPOTrainer`` (sigmoid loss), reference model = frozen copy, sequential sampler over the harness's order."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(setup)
    data = prepare_data(setup, tokenizer)
    model = build_model(setup, len(tokenizer))
    fingerprint = weights_fingerprint(model)
    reference = copy.deepcopy(model)
    if setup.trl_data == "ids":
        ordered = data.ordered
        columns: dict[str, list[Any]] = {
            "prompt_ids": [pair.prompt_ids for pair in ordered],
            "chosen_ids": [pair.chosen_ids for pair in ordered],
            "rejected_ids": [pair.rejected_ids for pair in ordered],
        }
        note = "harness token ids (DPOTrainer._prepare_dataset bypassed: TRL 1.16 re-tokenizes text only)"
    else:
        prompts = data.ordered_prompts
        columns = {
            "prompt": [pair.prompt for pair in prompts],
            "chosen": [pair.chosen for pair in prompts],
            "rejected": [pair.rejected for pair in prompts],
        }
        note = f"text, tokenized by TRL (max_length={setup.max_length}, keep_start): batches differ from the others"
    stamps: list[float] = []
    losses: list[float] = []
    digests: list[str] = []

    class RecordingDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if setup.trl_data == "ids":
                return dataset  # already prompt_ids/chosen_ids/rejected_ids, the columns TRL's collator reads
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                digests.append(batch_digest(inputs["input_ids"], inputs["attention_mask"]))
                losses.append(float((output[0] if return_outputs else output).detach()))
            return output

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            report_to="none",
            per_device_train_batch_size=setup.batch_size,
            max_steps=setup.total_steps,
            learning_rate=setup.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=0.0,  # no clipping, as in the other two
            optim="adamw_torch",  # torch.optim.AdamW, as in the other two (TRL's default here is the fused variant)
            beta=setup.beta,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
            max_length=setup.max_length,
            train_sampling_strategy="sequential",
            gradient_checkpointing=False,  # TRL defaults to True; the others keep activations
            bf16=False,
            fp16=False,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=setup.seed,
        )
        trainer = RecordingDPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=Dataset.from_dict(columns),
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        torch.set_num_threads(THREADS)
        setup_rss = peak_rss_mb()
        trainer.train()
    threads, parameters = torch.get_num_threads(), parameter_count(model)
    return Result("trl", stamps, losses, digests, peak_rss_mb(), setup_rss, threads, parameters, fingerprint, note)


def run_bare(setup: Setup) -> Result:
    """A plain loop: the harness's collate, chosen+rejected in one forward, -logsigmoid(β h), AdamW."""
    from bare_dpo import dpo_step

    from expo_bench.contracts import concat_sequences
    from expo_bench.lm.tokenize import collate_pairs

    tokenizer = load_tokenizer(setup)
    data = prepare_data(setup, tokenizer)
    policy = build_model(setup, len(tokenizer)).train()
    fingerprint = weights_fingerprint(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=setup.lr, weight_decay=0.0)
    ordered = data.ordered
    stamps: list[float] = []
    losses: list[float] = []
    digests: list[str] = []

    setup_rss = peak_rss_mb()
    for step in range(setup.total_steps):
        batch = collate_pairs(ordered[step * setup.batch_size : (step + 1) * setup.batch_size], data.pad_token_id)
        both = concat_sequences(batch.chosen, batch.rejected)
        losses.append(dpo_step(policy, reference, both, setup.beta, optimizer))
        digests.append(batch_digest(both["input_ids"], both["attention_mask"]))
        stamps.append(time.perf_counter())
    return Result(
        "bare", stamps, losses, digests, peak_rss_mb(), setup_rss, torch.get_num_threads(), parameter_count(policy), fingerprint
    )


RUNNERS = {"harness": run_harness, "trl": run_trl, "bare": run_bare}


def child(contender: str, setup_path: Path, out_path: Path) -> None:
    """One contender in this (fresh) process; its result goes to ``out_path`` as JSON."""
    torch.set_num_threads(THREADS)
    setup = Setup(**json.loads(setup_path.read_text()))
    result = RUNNERS[contender](setup)
    out_path.write_text(json.dumps(dataclasses.asdict(result)))


# -- the parent: one set of weights, one subprocess per contender, one table ----------------------------------------


def save_initial_weights(setup: Setup) -> tuple[int, float, float]:
    """Build the model once from the seed and save its state dict; also the data's token counts for the header."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(setup)
    torch.manual_seed(setup.seed)
    model = AutoModelForCausalLM.from_config(model_config(setup, len(tokenizer)))
    torch.save(model.state_dict(), setup.weights)
    real, padded = token_counts(prepare_data(setup, tokenizer), setup.batch_size)
    return parameter_count(model), real, padded


def run_contender(contender: str, setup_path: Path, workdir: Path, timeout: float) -> Result | str:
    out_path = workdir / f"{contender}.json"
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--child", contender, "--setup", str(setup_path), "--out", str(out_path)]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if finished.returncode != 0:
        return f"exit {finished.returncode}: " + finished.stderr.strip()[-2000:]
    return Result(**json.loads(out_path.read_text()))


def versions() -> str:
    from importlib.metadata import version

    packages = ("torch", "lightning", "transformers", "trl", "datasets")
    return ", ".join(f"{name} {version(name)}" for name in packages) + f", Python {platform.python_version()}"


def report(setup: Setup, results: dict[str, Result | str], parameters: int, tokens: tuple[float, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    done = {name: result for name, result in results.items() if isinstance(result, Result)}
    threads = sorted({result.threads for result in done.values()})
    console.print(f"{versions()}; torch threads per process: {', '.join(map(str, threads)) or '?'}; host CPUs: {os.cpu_count()}")
    console.print(
        f"model: GPT-NeoX hidden {setup.hidden_size}, {setup.layers} layers, {setup.heads} heads, "
        f"{parameters:,} parameters (fp32, CPU); "
        f"DPO β={setup.beta}, AdamW lr={setup.lr:g}, no warmup, no clipping"
    )
    console.print(
        f"data: HH helpful-base test, {setup.batch_size} pairs/batch, max_length {setup.max_length} "
        f"(prompt {setup.max_prompt_length}); {setup.steps} timed steps after {setup.warmup} warmup steps"
    )
    console.print(f"tokens per batch (chosen + rejected rows): {tokens[0]:.0f} real, {tokens[1]:.0f} with padding")
    if "trl" in done:
        console.print(f"TRL fed: {done['trl'].note}")
    fingerprints = {result.weights_fingerprint for result in done.values()}
    console.print(f"initial weights identical across contenders: {len(fingerprints) == 1} ({', '.join(sorted(fingerprints))})")
    console.print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    speed = {name: 1 / result.seconds_per_step(setup.warmup) for name, result in done.items()}
    reference_digests = done["harness"].batch_digests if "harness" in done else None
    table = Table(title=f"DPO steady-state throughput, {setup.steps} steps")
    for column in ("contender", "steps/s", "s/step", "best s/step", "vs bare", "vs TRL", "peak RSS MB", "RSS at start MB"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for column in ("loss@1", "loss@2", f"loss@{setup.total_steps}", "same batches"):
        table.add_column(column, justify="right")
    for name in CONTENDERS:
        result = results.get(name)
        if result is None:
            continue
        if isinstance(result, str):
            table.add_row(name, f"failed: {result.splitlines()[-1] if result else ''}")
            continue
        ratio = {other: f"{speed[name] / speed[other]:.2f}x" if other in speed else "-" for other in ("bare", "trl")}
        same = "-" if reference_digests is None else str(result.batch_digests == reference_digests)
        table.add_row(
            name,
            f"{speed[name]:.3f}",
            f"{1 / speed[name]:.3f}",
            f"{result.best_step(setup.warmup):.3f}",
            ratio["bare"],
            ratio["trl"],
            f"{result.peak_rss_mb:.0f}",
            f"{result.setup_rss_mb:.0f}",
            f"{result.losses[0]:.6f}",
            f"{result.losses[1]:.6f}" if len(result.losses) > 1 else "-",
            f"{result.losses[-1]:.6f}",
            same,
        )
    console.print(table)
    if len(done) > 1:
        for step in (0, 1, setup.total_steps - 1):
            values = [result.losses[step] for result in done.values() if len(result.losses) > step]
            console.print(f"max |Δ loss| between contenders at step {step + 1}: {max(values) - min(values):.2e}")
        console.print("(step 1 is ln 2 = 0.693147 for all, as policy = reference; the later steps show the updates agree)")
    for name, result in results.items():
        if isinstance(result, str):
            console.print(f"[red]{name} failed[/red]: {result}")
    if setup.profile and isinstance(results.get("harness"), Result):
        console.print("the harness's steps by Lightning hook (SimpleProfiler):", markup=False)
        print(done["harness"].note)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender (20 on a quiet machine)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the timing (3 on a quiet machine)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(SHARED / "hh-rlhf"), help="local Anthropic HH folder")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt-neox-20b"))
    parser.add_argument(
        "--trl-data",
        choices=("ids", "text"),
        default="ids",
        help="feed TRL the harness's token ids (same batches) or the texts for TRL to tokenize itself",
    )
    parser.add_argument("--profile", action="store_true", help="print where the harness's step time goes, by Lightning hook")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), help="contenders to run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per contender")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.setup, args.out)
        return
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="dpo_throughput_") as tmp:
        workdir = Path(tmp)
        setup = Setup(
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            hidden_size=args.hidden_size,
            layers=args.layers,
            heads=args.heads,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            beta=0.1,
            lr=1e-4,
            seed=args.seed,
            data=args.data,
            tokenizer=args.tokenizer,
            weights=str(workdir / "initial.pt"),
            trl_data=args.trl_data,
            profile=args.profile,
        )
        setup_path = workdir / "setup.json"
        setup_path.write_text(json.dumps(dataclasses.asdict(setup)))
        parameters, *tokens = save_initial_weights(setup)
        results: dict[str, Result | str] = {}
        for contender in args.only:
            started = time.perf_counter()
            results[contender] = run_contender(contender, setup_path, workdir, args.timeout)
            print(f"{contender}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report(setup, results, parameters, (tokens[0], tokens[1]))


if __name__ == "__main__":
    main()
