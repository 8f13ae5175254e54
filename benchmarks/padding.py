"""How much of a DPO batch is padding on Anthropic HH, with the harness's shuffled batches and with length grouping
(``train.group_by_length``): real HH pairs (a local split), the Pythia tokenizer, the DPO paper's truncation.

A batch's chosen and rejected rows are padded to its longest prompt + response; padding fraction = pad positions /
all positions, over an epoch's batches. Prints one JSON line.

    python benchmarks/padding.py [--split test] [--batch-size 64] [--groups 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expo_bench.lm.data import EpochSeededSampler, LengthGroupedSampler
from expo_bench.lm.hh import load_hh_pairs
from expo_bench.lm.tokenize import TokenizationConfig, tokenize_pair

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def padding_fraction(order: list[int], prompt: list[int], chosen: list[int], rejected: list[int], batch: int) -> float:
    real = padded = 0
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(prompt[i] + max(chosen[i], rejected[i]) for i in rows)
        real += sum(2 * prompt[i] + chosen[i] + rejected[i] for i in rows)
        padded += 2 * len(rows) * width
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "hh-rlhf"))
    parser.add_argument("--subset", default="helpful-base")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt-neox-20b"))
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per global batch (the DPO paper's 64)")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16], help="group_by_length values to measure")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    pairs, _ = load_hh_pairs(args.data, args.subset, args.split)
    config = TokenizationConfig(max_length=512, max_prompt_length=256)
    tokenized = [tokenize_pair(tokenizer, pair, config) for pair in pairs]
    prompt = [len(pair.prompt_ids) for pair in tokenized]
    chosen = [len(pair.chosen_ids) for pair in tokenized]
    rejected = [len(pair.rejected_ids) for pair in tokenized]
    lengths = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected, strict=True)]

    def mean_over_seeds(sampler_of: object) -> float:
        fractions = [
            padding_fraction(sampler_of(seed).order(), prompt, chosen, rejected, args.batch_size)  # type: ignore[operator]
            for seed in range(args.seeds)
        ]
        return round(sum(fractions) / len(fractions), 4)

    result: dict[str, object] = {"pairs": len(tokenized), "batch_size": args.batch_size, "seeds": args.seeds}
    result["padding_shuffled"] = mean_over_seeds(lambda seed: EpochSeededSampler(len(lengths), seed))
    for group in args.groups:
        result[f"padding_group_by_length_{group}"] = mean_over_seeds(
            lambda seed, group=group: LengthGroupedSampler(lengths, seed, args.batch_size, group)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
