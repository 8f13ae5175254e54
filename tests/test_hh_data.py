"""HH-RLHF pairs on the real test splits (documented counts, clean splits) and their tokenization into batches."""

from __future__ import annotations

import gzip
import json
import lzma
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA, missing

from expo_bench.contracts import Sequences, concat_sequences
from expo_bench.errors import DataError
from expo_bench.lm.hh import ASSISTANT, HHSplitReport, load_hh_pairs, read_jsonl, split_hh
from expo_bench.lm.pairs import PromptPair
from expo_bench.lm.tokenize import TokenizationConfig, collate_pairs, fingerprint_tokenizer, tokenize_pair

DATA = SHARED_DATA
HH = DATA / "hh-rlhf"
NEOX = DATA / "tokenizers" / "gpt-neox-20b"

# subset: (records, prompt mismatches, identical responses, pairs a character-level common prefix cuts into)
SUBSETS = {
    "harmless-base": (2312, 5, 0, 444),
    "helpful-base": (2354, 9, 2, 433),
    "helpful-online": (1137, 0, 2, 391),
    "helpful-rejection-sampled": (2749, 3, 32, 677),
}


@pytest.fixture(scope="module")
def hh() -> Path:
    if not HH.is_dir():
        pytest.skip(missing(HH))
    return HH


@pytest.fixture(scope="module")
def helpful_base(hh: Path) -> list[PromptPair]:
    return load_hh_pairs(str(hh), "helpful-base", "test")[0]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    if not NEOX.is_dir():
        pytest.skip(missing(NEOX))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(NEOX))
    loaded.pad_token = loaded.pad_token or loaded.eos_token
    return loaded


# --- splitting ---------------------------------------------------------------------------------------------


def test_split_at_last_assistant_turn_keeps_leading_space() -> None:
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a fruit\n\nAssistant:"
    assert split_hh(prompt + " Apple", prompt + " A rock") == PromptPair(prompt, " Apple", " A rock")
    assert split_hh(prompt + " Apple", "\n\nHuman: Other\n\nAssistant: Apple") == "prompt_mismatch"
    assert split_hh("\n\nHuman: Hi", prompt + " Apple") == "no_assistant_turn"
    assert split_hh(prompt + " Apple", prompt + " Apple") == "identical_responses"


@pytest.mark.parametrize("subset", SUBSETS)
def test_test_splits_give_documented_counts(hh: Path, subset: str) -> None:
    records, mismatched, identical, _ = SUBSETS[subset]
    pairs, report = load_hh_pairs(str(hh), subset, "test")
    assert (report.total, report.malformed) == (records, 0)
    assert report.dropped == Counter(prompt_mismatch=mismatched, identical_responses=identical)
    assert report.kept == len(pairs) == records - mismatched - identical
    assert report.summary().startswith(f"{records} pairs: kept {report.kept}, dropped ")


def test_totals_over_all_test_splits(hh: Path) -> None:
    reports = [load_hh_pairs(str(hh), subset, "test")[1] for subset in SUBSETS]
    assert sum(report.total for report in reports) == 8552
    assert sum((report.dropped for report in reports), Counter()) == Counter(prompt_mismatch=17, identical_responses=36)


@pytest.mark.parametrize("subset", SUBSETS)
def test_kept_pairs_reassemble_the_dialogues_exactly(hh: Path, subset: str) -> None:
    """No prompt holds part of a response: prompt + response is each original dialogue, split at the last turn."""
    cut_by_common_prefix = 0
    for record in read_jsonl(hh / subset / "test.jsonl.gz", skip_malformed=False, report=HHSplitReport()):
        pair = split_hh(record["chosen"], record["rejected"])
        if isinstance(pair, str):
            continue
        assert pair.prompt + pair.chosen == record["chosen"] and pair.prompt + pair.rejected == record["rejected"]
        assert pair.prompt.endswith(ASSISTANT) and ASSISTANT not in pair.chosen + pair.rejected
        # The character-level extractor this split avoids (DESIGN §4): past the shared leading space it cuts a response.
        common = os.path.commonprefix([record["chosen"], record["rejected"]])  # noqa: RUF071
        cut_by_common_prefix += len(common) > len(pair.prompt) + 1
    assert cut_by_common_prefix == SUBSETS[subset][3]


# --- reading files -----------------------------------------------------------------------------------------

GOOD = json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"})
MALFORMED = {
    "bad JSON": ('{"chosen": "x",', "invalid JSON"),
    "missing field": (json.dumps({"chosen": "x"}), "'rejected' is missing"),
    "non-string field": (json.dumps({"chosen": "x", "rejected": 3}), "'rejected' is int"),
    "not an object": ("[1, 2]", "a list, not an object"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_line_names_file_line_and_expectation(tmp_path: Path, case: str) -> None:
    line, problem = MALFORMED[case]
    path = tmp_path / "test.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_hh_pairs(str(path), None, "test")
    message = str(error.value)
    assert f"{path}, line 2: expected a JSON object with string fields 'chosen' and 'rejected'" in message
    assert problem in message


def test_skip_malformed_counts_skipped_lines(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl.gz"
    lines = [GOOD, *(line for line, _ in MALFORMED.values()), "", GOOD]
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    pairs, report = load_hh_pairs(str(path), None, "test", skip_malformed=True)
    assert (report.total, report.kept, report.malformed, len(pairs)) == (2, 2, len(MALFORMED), 2)
    assert "4 malformed lines skipped" in report.summary()


def test_folder_lookup_finds_xz_split(tmp_path: Path) -> None:
    (tmp_path / "helpful-base").mkdir()
    with lzma.open(tmp_path / "helpful-base" / "train.jsonl.xz", "wt", encoding="utf-8") as file:
        file.write(GOOD + "\n")
    pairs, _ = load_hh_pairs(str(tmp_path), "helpful-base", "train")
    assert pairs == [PromptPair("\n\nHuman: Hi\n\nAssistant:", " Hello", " Go away")]
    with pytest.raises(DataError, match=r"no split 'test' there; looked for .*test\.jsonl, .*test\.jsonl\.gz"):
        load_hh_pairs(str(tmp_path), "helpful-base", "test")


def test_missing_or_unknown_local_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "test.json").write_text(GOOD, encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.json: expected a \.jsonl, \.jsonl\.gz, \.jsonl\.xz file"):
        load_hh_pairs(str(tmp_path / "test.json"), None, "test")
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}: no such file or folder, and not the hub dataset id 'Anthropic/hh-rlhf'"):
        load_hh_pairs(str(missing), "helpful-base", "test")


def test_hub_id_loads_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(path: str, data_dir: str | None = None, split: str | None = None) -> list[dict[str, str]]:
        calls.append((path, data_dir, split))
        return [json.loads(GOOD)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, report = load_hh_pairs("Anthropic/hh-rlhf", "harmless-base", "test")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test")]
    assert (len(pairs), report.kept) == (1, 1)


# --- tokenization ------------------------------------------------------------------------------------------


def test_config_needs_room_for_a_response() -> None:
    with pytest.raises(ValueError, match="max_prompt_length"):
        TokenizationConfig(max_length=256, max_prompt_length=256)
    with pytest.raises(ValueError, match="did you mean 'max_length'"):
        TokenizationConfig.model_validate({"max_lenght": 10})


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_respects_limits_on_helpful_base(tokenizer: Any, helpful_base: list[PromptPair], mode: str) -> None:
    config = TokenizationConfig(max_length=512, max_prompt_length=256, prompt_truncation=mode)
    assistant_tag = tokenizer(ASSISTANT, add_special_tokens=False)["input_ids"]
    tokenized = [tokenize_pair(tokenizer, pair, config) for pair in helpful_base]
    for pair, result in zip(helpful_base, tokenized, strict=True):
        full_prompt = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
        assert len(result.prompt_ids) + max(len(result.chosen_ids), len(result.rejected_ids)) <= 512
        assert min(len(result.chosen_ids), len(result.rejected_ids)) >= 1
        if result.prompt_truncated:
            kept = full_prompt[-256:] if mode == "keep_end" else full_prompt[:256]
            assert result.prompt_ids == kept
        else:
            assert result.prompt_ids == full_prompt
        if mode == "keep_end":
            assert result.prompt_ids[-len(assistant_tag) :] == assistant_tag
        if result.response_truncated:
            assert max(len(result.chosen_ids), len(result.rejected_ids)) == 512 - len(result.prompt_ids)
        else:
            assert result.chosen_ids[-1] == result.rejected_ids[-1] == tokenizer.eos_token_id
    # Measured with the Pythia tokenizer on the 2,343 kept helpful-base test pairs.
    assert sum(result.prompt_truncated for result in tokenized) == 89
    assert sum(result.response_truncated for result in tokenized) == 10


def test_tiny_limits_still_leave_a_response_token(tokenizer: Any, helpful_base: list[PromptPair]) -> None:
    result = tokenize_pair(tokenizer, helpful_base[0], TokenizationConfig(max_length=2, max_prompt_length=1))
    assert (len(result.prompt_ids), len(result.chosen_ids), len(result.rejected_ids)) == (1, 1, 1)
    assert result.prompt_truncated and result.response_truncated


def check_side(sequences: Sequences, tokens: torch.Tensor, prompts: list[list[int]], responses: list[list[int]]) -> None:
    """Prompt tokens out of the loss, response tokens (with EOS) in it, padding invisible to both masks."""
    input_ids, attention_mask, loss_mask = sequences["input_ids"], sequences["attention_mask"], sequences["loss_mask"]
    assert (input_ids.dtype, attention_mask.dtype, loss_mask.dtype) == (torch.long, torch.long, torch.bool)
    assert loss_mask.sum(-1).tolist() == tokens.tolist()
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        end = len(prompt) + len(response)
        assert input_ids[row, : len(prompt)].tolist() == prompt and not loss_mask[row, : len(prompt)].any()
        assert input_ids[row][loss_mask[row]].tolist() == response
        assert attention_mask[row, :end].all() and not attention_mask[row, end:].any() and not loss_mask[row, end:].any()


def test_collated_batches_mask_exactly_the_responses(tokenizer: Any, helpful_base: list[PromptPair]) -> None:
    config = TokenizationConfig()
    for start in range(0, len(helpful_base), 64):
        originals = helpful_base[start : start + 64]
        pairs = [tokenize_pair(tokenizer, pair, config) for pair in originals]
        batch = collate_pairs(pairs, tokenizer.pad_token_id)
        width = max(len(pair.prompt_ids) + len(ids) for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids))
        assert batch.chosen["input_ids"].shape == batch.rejected["input_ids"].shape == (len(pairs), width)
        assert concat_sequences(batch.chosen, batch.rejected)["input_ids"].shape == (2 * len(pairs), width)
        assert batch.label.tolist() == [1.0] * len(pairs) and batch.reference_chosen_logps is None and batch.kl_samples is None
        prompts = [pair.prompt_ids for pair in pairs]
        check_side(batch.chosen, batch.chosen_tokens, prompts, [pair.chosen_ids for pair in pairs])
        check_side(batch.rejected, batch.rejected_tokens, prompts, [pair.rejected_ids for pair in pairs])
        for row, (original, pair) in enumerate(zip(originals, pairs, strict=True)):
            for sequences, text in ((batch.chosen, original.chosen), (batch.rejected, original.rejected)):
                if not pair.response_truncated:
                    assert (
                        tokenizer.decode(sequences["input_ids"][row][sequences["loss_mask"][row]]) == text + tokenizer.eos_token
                    )
            if not pair.prompt_truncated:
                assert tokenizer.decode(pair.prompt_ids) == original.prompt


def test_tokenizer_fingerprint_is_stable_and_content_sensitive(tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    fingerprint = fingerprint_tokenizer(tokenizer)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    fresh = AutoTokenizer.from_pretrained(str(NEOX))
    assert fingerprint_tokenizer(fresh) == fingerprint
    fresh.add_tokens(["<|new token|>"])
    assert fingerprint_tokenizer(fresh) != fingerprint


@pytest.mark.parametrize("two_splits", [False, True])
def test_held_out_prompts_are_never_training_prompts(tmp_path: Path, tokenizer: Any, two_splits: bool) -> None:
    from rich.console import Console

    from expo_bench.tasks.hh import HHTask

    def record(turn: int, answer: str) -> str:
        prompt = f"\n\nHuman: question {turn}{ASSISTANT}"
        return json.dumps({"chosen": f"{prompt} good {answer}", "rejected": f"{prompt} bad {answer}"})

    # every prompt twice, with different responses: a split by pairs would put one copy on each side
    lines = [record(turn, answer) for turn in range(20) for answer in ("a", "b")]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    (tmp_path / "test.jsonl").write_text("\n".join([*lines[:10], *(record(turn, "c") for turn in range(100, 105))]))
    task = HHTask.model_validate(
        {
            "kind": "hh",
            "source": str(tmp_path),
            "data_dir": None,
            "tokenizer": str(NEOX),
            "model": {"tiny": {"model_type": "gpt_neox"}},
            "train_split": "train",
            "eval_split": "test" if two_splits else "train",
            "max_eval_pairs": 8,
        }
    )
    log = Console(record=True, width=200)
    examples = task.sft_examples(0, tokenizer, log)
    train, held_out = ({tuple(pair.prompt_ids) for pair in pairs} for pairs in (examples.train, examples.held_out))
    assert train and held_out and not train & held_out
    dropped = "10 held-out pairs dropped" if two_splits else "training pairs dropped: their prompt is a held-out prompt"
    assert dropped in log.export_text()
