"""Six DPO-family configurations on one model and one dataset: one expo-bench sweep vs six independent TRL runs.

The sweep (``expo-bench run`` of a recipe this script writes) fine-tunes the SFT reference once, scores the pairs under
it once (``reference: cached``) and trains six configurations from it. Each TRL run is what one writes with TRL alone:
a fresh process that fine-tunes its own SFT model (``SFTTrainer``) and then trains one configuration with
``DPOTrainer`` (reference = a frozen copy of its SFT model, run on every step, TRL's default). The budget is the same:
the same tiny GPT-NeoX architecture (Pythia's tokenizer), the same HH pairs (helpful-base test split), one SFT epoch
on the chosen responses (batch 8, AdamW 1e-3), one preference epoch (batch 8, AdamW 1e-4, no clipping), fp32 on the
CPU with the same threads. The six, as each library names them:

    DPO β 0.1          dpo                      sigmoid
    DPO β 0.5          dpo                      sigmoid, beta 0.5
    cDPO ε 0.1         dpo label_smoothing 0.1  sigmoid, label_smoothing 0.1
    IPO τ 0.1          ipo                      ipo
    f-DPO (JS) β 0.1   fdpo_js                  sigmoid, f_divergence_type js_divergence
    RPO α 0.5          rpo                      sigmoid + sft, loss_weights [1, 0.5]

Wall time counts everything a user waits for: process start, data, SFT, training, and (the sweep's) held-out
validation, tracking and the leaderboard.

    python benchmarks/sweep_vs_trl.py [--pairs 128] [--hidden-size 64] [--layers 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
THREADS = 2
CONFIGURATIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("dpo", {"method": "dpo", "params": {"beta": 0.1}}, {"beta": 0.1, "loss_type": ["sigmoid"]}),
    ("dpo-b0.5", {"method": "dpo", "label": "dpo-b0.5", "params": {"beta": 0.5}}, {"beta": 0.5, "loss_type": ["sigmoid"]}),
    (
        "cdpo",
        {"method": "dpo", "label": "cdpo", "params": {"beta": 0.1, "label_smoothing": 0.1}},
        {"beta": 0.1, "loss_type": ["sigmoid"], "label_smoothing": 0.1},
    ),
    ("ipo", {"method": "ipo", "params": {"tau": 0.1}}, {"beta": 0.1, "loss_type": ["ipo"]}),
    (
        "fdpo_js",
        {"method": "fdpo_js", "params": {"beta": 0.1}},
        {"beta": 0.1, "loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    ),
    (
        "rpo",
        {"method": "rpo", "params": {"beta": 0.1, "alpha": 0.5}},
        {"beta": 0.1, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    ),
]


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model_type": "gpt_neox",
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "intermediate_size": 4 * args.hidden_size,
        "max_position_embeddings": 2 * args.max_length,
    }


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep: the six configurations of one recipe, SFT and reference log-probs shared."""
    return {
        "experiment": "sweep_vs_trl",
        "seeds": [0],
        "task": {
            "kind": "hh",
            "source": str(SHARED / "hh-rlhf"),
            "data_dir": "helpful-base",
            "train_split": "test",
            "eval_split": "test",
            "max_train_pairs": args.pairs,
            "max_eval_pairs": 16,
            "tokenizer": str(SHARED / "tokenizers" / "gpt-neox-20b"),
            "tokenization": {"max_length": args.max_length, "max_prompt_length": args.max_length * 3 // 4},
            "model": {"tiny": model_settings(args)},
            "reference": "cached",
            "sft": {"max_epochs": 1, "batch_size": 8, "optimizer": {"name": "AdamW", "lr": 1.0e-3}, "accelerator": "cpu"},
        },
        "train": {
            "max_epochs": 1,
            "batch_size": 8,
            "optimizer": {"name": "AdamW", "lr": 1.0e-4},
            "accelerator": "cpu",
            "log_every_n_steps": 8,
        },
        "methods": [harness for _, harness, _ in CONFIGURATIONS],
    }


def trl_run(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """One independent TRL run (in its own process): SFT on the chosen responses, then DPOTrainer."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from expo_bench.lm.hh import load_hh_pairs
    from expo_bench.lm.tokenize import TokenizationConfig, tokenize_pair

    torch.set_num_threads(THREADS)
    pairs, _ = load_hh_pairs(str(SHARED / "hh-rlhf"), "helpful-base", "test")
    pairs = pairs[: args.pairs]
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt-neox-20b")
    tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.for_model(**model_settings(args), vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    common: dict[str, Any] = {
        "use_cpu": True,
        "report_to": "none",
        "per_device_train_batch_size": 8,
        "num_train_epochs": 1,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "optim": "adamw_torch",
        "gradient_checkpointing": False,
        "bf16": False,
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "max_length": args.max_length,
    }
    # TRL is fed the harness's token ids (prompt truncated from the left to 3/4 of max_length, as the recipe's
    # tokenization): both train on exactly the same tokens, and TRL drops no pair whose prompt alone fills max_length
    tokenization = TokenizationConfig(max_length=args.max_length, max_prompt_length=args.max_length * 3 // 4)
    tokenized = [tokenize_pair(tokenizer, pair, tokenization) for pair in pairs]
    common["max_length"] = None  # already truncated

    class TokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # prompt_ids/chosen_ids/rejected_ids, the columns TRL's collator reads

    with tempfile.TemporaryDirectory() as out:
        sft = Dataset.from_dict(
            {
                "input_ids": [t.prompt_ids + t.chosen_ids for t in tokenized],
                "completion_mask": [[0] * len(t.prompt_ids) + [1] * len(t.chosen_ids) for t in tokenized],
            }
        )
        sft_args = SFTConfig(output_dir=out, learning_rate=1e-3, **common)
        SFTTrainer(model=model, args=sft_args, train_dataset=sft, processing_class=tokenizer).train()
        preferences = Dataset.from_dict(
            {
                "prompt_ids": [t.prompt_ids for t in tokenized],
                "chosen_ids": [t.chosen_ids for t in tokenized],
                "rejected_ids": [t.rejected_ids for t in tokenized],
            }
        )
        dpo = DPOConfig(output_dir=out, learning_rate=1e-4, precompute_ref_log_probs=False, **common, **settings)
        reference = copy.deepcopy(model).eval()  # a frozen copy of this run's SFT model
        trainer = TokenizedDPOTrainer(
            model=model, ref_model=reference, args=dpo, train_dataset=preferences, processing_class=tokenizer
        )
        trainer.train()


def timed(command: list[str], environment: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128, help="training pairs (and SFT examples)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_run(args, json.loads(args.trl_child))
        return
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
    }
    sizes = ["--pairs", str(args.pairs), "--hidden-size", str(args.hidden_size), "--layers", str(args.layers)]
    sizes += ["--max-length", str(args.max_length)]
    with tempfile.TemporaryDirectory(prefix="sweep-vs-trl-") as scratch:
        recipe_path = Path(scratch) / "six.yaml"
        recipe_path.write_text(json.dumps(recipe(args)))  # YAML reads JSON
        script = shutil.which("expo-bench", path=str(Path(sys.executable).parent))
        assert script is not None, "install the package first: pip install -e ."
        sweep = timed([script, "run", str(recipe_path), "--results", str(Path(scratch) / "results")], environment)
        runs = []
        for name, _, settings in CONFIGURATIONS:
            command = [sys.executable, str(Path(__file__).resolve()), *sizes, "--trl-child", json.dumps(settings)]
            runs.append((name, timed(command, environment)))
            print(f"TRL {name}: {runs[-1][1]:.1f} s", file=sys.stderr)
    trl = sum(seconds for _, seconds in runs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {THREADS} torch threads, Python {platform.python_version()}")
    print(f"model: GPT-NeoX hidden {args.hidden_size}, {args.layers} layers; {args.pairs} HH pairs, max_length {args.max_length}")
    print(f"{'':<38}{'wall s':>10}")
    print(f"{'expo-bench sweep (6 configurations)':<38}{sweep:>10.1f}")
    for name, seconds in runs:
        print(f"{'TRL SFT + DPOTrainer: ' + name:<38}{seconds:>10.1f}")
    print(f"{'TRL, six runs one after another':<38}{trl:>10.1f}")
    print(f"sweep / six TRL runs: {sweep / trl:.2f}x")


if __name__ == "__main__":
    main()
