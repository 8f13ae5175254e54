"""A shipped recipe's rehearsal on this machine, derived from the file mechanically: only what this machine lacks is
swapped — the model (a tiny config of the same ``model_type``), hub data and tokenizers (their local twins), hub-only
components (a tiny sentiment classifier), the accelerator and device count (2 CPU ranks where the recipe is
multi-device), the judge's endpoint (the stand-in server) and sizes (pairs, prompts, tokens, epochs, batch). Every
other setting (strategy, precision, optimizer, warmup, clipping, accumulation, determinism, reference mode and
samples, methods and their parameters, temperatures, baselines) comes from the file, so a setting added to a recipe
is rehearsed without editing this module. :data:`SWAPPED` lists, as patterns over field paths, all that may change."""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).parent.parent
SHARED = ROOT.parent / "shared" / "data"

TINY_MODELS: dict[str, dict[str, Any]] = {
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 32, "max_position_embeddings": 128},
    "llama": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 32, "max_position_embeddings": 128},
    "gpt2": {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 128},
}  # fmt: skip
"""A tiny architecture per ``model_type``: a recipe's model is rehearsed by the tiny one of its family."""

HUB_MODELS = {
    "EleutherAI/pythia-2.8b": ("gpt_neox", "tokenizers/gpt-neox-20b"),
    "meta-llama/Meta-Llama-3-8B": ("llama", "tokenizers/gpt2"),  # no Llama-3 tokenizer offline: GPT-2's stands in
    "gpt2-large": ("gpt2", "tokenizers/gpt2"),
}
"""A shipped recipe's hub model → its ``model_type`` and the local tokenizer (under the shared data) standing in."""

TESTS_DATA = ROOT / "tests" / "data"
HUB_DATA: dict[str, dict[str, Any]] = {
    "Anthropic/hh-rlhf": {"source": "{data}/hh-rlhf", "train_split": "test", "eval_split": "test"},
    "HuggingFaceH4/ultrafeedback_binarized": {"source": str(TESTS_DATA / "ultrafeedback_tiny")},
    "tatsu-lab/alpaca_eval": {"source": str(TESTS_DATA / "alpaca_eval_tiny.jsonl"), "name": None, "split": None},
    "stanfordnlp/imdb": {"source": "{data}/imdb", "train_split": "train_sample", "eval_split": "test_sample"},
}
"""A hub dataset → the fields that point a data section at its local twin (None: the field is dropped; ``{data}``:
the shared data folder)."""

SIZES = {
    "max_epochs": 1,
    "max_train_pairs": 48,
    "max_eval_pairs": 16,
    "max_length": 64,
    "max_prompt_length": 40,
    "max_new_tokens": 6,
    "batch_size": 2,
    "prompts": 3,
    "train_prompts": 12,
    "eval_prompts": 6,
    "sft_reviews": 32,
    "num_proc": 1,
}
"""Size fields, capped wherever they appear (and the data's pair and review counts set where the recipe leaves them
whole); the rest of a section is the recipe's."""

DATA_SIZES = {"hh": ("max_train_pairs", "max_eval_pairs"), "preference": ("max_train_pairs",), "imdb": ("sft_reviews",)}
"""The size fields a task of each kind gets even where the recipe reads its whole data."""

STAND_IN_KEY = "rehearsal-key"
"""What the rehearsal puts in the judge's ``api_key_env`` variable (the stand-in server takes any key)."""

SWAPPED = [
    "task.model.name_or_path",
    "task.model.tiny",
    "task.tokenizer",
    "*.source",
    "task.train_split",
    "task.eval_split",
    "task.test.name",
    "task.test.split",
    "task.reward_model.name_or_path",
    "*.accelerator",
    "*.devices",
    "*.judge.base_url",
    *(f"*.{size}" for size in SIZES),
    *(f"task.{size}" for sizes in DATA_SIZES.values() for size in sizes),
]
"""Every field path a rehearsal may change; anything else must come from the recipe as it is."""


def real_scale(recipe: Mapping[str, Any]) -> bool:
    """A recipe for a machine with the hub (and GPUs): its model is a hub model, not a tiny config."""
    model = recipe.get("task", {}).get("model") or {}
    return "name_or_path" in model


def _capped(section: Any) -> Any:
    if isinstance(section, dict):
        return {key: min(value, SIZES[key]) if _is_size(key, value) else _capped(value) for key, value in section.items()}
    if isinstance(section, list):
        return [_capped(item) for item in section]
    return section


def _is_size(key: str, value: Any) -> bool:
    return key in SIZES and isinstance(value, int) and not isinstance(value, bool)


def _hardware(section: Any, accelerator: str, devices: int) -> Any:
    """``accelerator: gpu`` → ``accelerator``, and ``devices`` where the recipe asks for more than one."""
    if isinstance(section, dict):
        found = {key: _hardware(value, accelerator, devices) for key, value in section.items()}
        if found.get("accelerator") in ("gpu", "cuda"):
            found["accelerator"] = accelerator
        if isinstance(found.get("devices"), int) and found["devices"] > 1:
            found["devices"] = devices
        return found
    if isinstance(section, list):
        return [_hardware(item, accelerator, devices) for item in section]
    return section


def _local_data(section: dict[str, Any], data: Path) -> None:
    for key, value in HUB_DATA.get(section.get("source", ""), {}).items():
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value.format(data=data)


def rehearsal(
    recipe: Mapping[str, Any],
    judge_url: str,
    classifier: Path | None = None,
    accelerator: str = "cpu",
    devices: int = 2,
    data: Path = SHARED,
) -> dict[str, Any]:
    """``recipe`` with only what this machine lacks swapped (see the module's docstring): on CPU ranks by default, or
    on one GPU (``accelerator="gpu", devices=1``), with the shared data from ``data``."""
    found: dict[str, Any] = _hardware(_capped(copy.deepcopy(dict(recipe))), accelerator, devices)
    task = found["task"]
    hub_model = task["model"].pop("name_or_path")
    if hub_model not in HUB_MODELS:
        raise KeyError(f"{hub_model}: add its model_type and a stand-in tokenizer to tests/rehearsal.py's HUB_MODELS")
    model_type, tokenizer = HUB_MODELS[hub_model]
    task["model"]["tiny"] = TINY_MODELS[model_type]
    task["tokenizer"] = str(data / tokenizer)
    _local_data(task, data)
    if isinstance(task.get("test"), dict):
        _local_data(task["test"], data)
    for size in DATA_SIZES.get(task["kind"], ()):
        task[size] = min(task.get(size) or SIZES[size], SIZES[size])
    reward_model = task.get("reward_model") or {}
    if reward_model.get("kind") == "huggingface":
        if classifier is None:
            raise ValueError("this recipe scores with a Hugging Face classifier: pass a tiny local one")
        reward_model["name_or_path"] = str(classifier)
    judge = (task.get("evaluation") or {}).get("judge") or {}
    if judge.get("kind") == "llm":
        judge["base_url"] = judge_url
    return found


def changed_paths(before: Any, after: Any, path: str = "") -> Iterator[str]:
    """The field paths where ``after`` differs from ``before`` (list items as ``[i]``)."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in dict.fromkeys([*before, *after]):
            yield from changed_paths(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            yield from changed_paths(old, new, f"{path}[{index}]")
    elif before != after:
        yield path


def unswapped(recipe: Mapping[str, Any], rehearsed: Mapping[str, Any]) -> list[str]:
    """Field paths the rehearsal changed that :data:`SWAPPED` does not allow (a list index matches any index)."""

    def swappable(path: str) -> bool:
        generic = re.sub(r"\[\d+\]", "", path)
        return any(fnmatch.fnmatchcase(generic, pattern) for pattern in SWAPPED)

    return [path for path in changed_paths(recipe, rehearsed) if not swappable(path)]


def tiny_classifier(folder: Path, data: Path = SHARED) -> Path:
    """A tiny two-label sentiment classifier on the GPT-2 tokenizer in ``folder``, standing in for a hub one."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizers" / "gpt2")
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=256, num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2ForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # rewards that differ by more than a recipe's margin
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def shipped_recipes() -> list[Path]:
    return sorted((ROOT / "recipes").glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))
