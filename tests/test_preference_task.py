"""The generic preference task: your own pairs from jsonl, parquet or the hub, plain text or conversational with a
chat template, soft labels that reach the batch, and the UltraFeedback twin end to end with an LLM judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from chat_server import serving
from conftest import SHARED_DATA, needs_shared_data
from rich.console import Console

from expo_bench.errors import DataError
from expo_bench.lm.hh import load_hh_pairs
from expo_bench.lm.pairs import PromptPair
from expo_bench.lm.preference_data import (
    DROP_REASONS,
    MessageKeys,
    PreferenceColumns,
    load_pairs,
    load_rows,
    tokenize_pairs,
)
from expo_bench.lm.tokenize import TokenizationConfig, collate_pairs, tokenize_pair
from expo_bench.recipe import select, validate_recipe
from expo_bench.runner import run_experiment

ROOT = Path(__file__).parent.parent
SHARED = SHARED_DATA
FIXTURE = ROOT / "tests" / "data" / "ultrafeedback_tiny"
TWIN = ROOT / "recipes" / "ultrafeedback_tiny_local.yaml"
pytestmark = needs_shared_data()
CONFIG = TokenizationConfig(max_length=96, max_prompt_length=64)


@pytest.fixture(scope="module")
def gpt2() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
    tokenizer.chat_template = yaml.safe_load(TWIN.read_text())["task"]["chat_template"]
    return tokenizer


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


TRL_STANDARD = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "p": 0.8},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five.", "p": 1.0},
    {"prompt": "Same answer:", "chosen": " yes", "rejected": " yes", "p": 0.5},
    {"prompt": "Water is", "chosen": " wet.", "rejected": " dry.", "p": 0.6},
]


def test_plain_text_pairs_from_jsonl_and_parquet_match_pair_by_pair_tokenization(tmp_path: Path, gpt2: Any) -> None:
    import datasets

    path = write_jsonl(tmp_path / "train.jsonl", TRL_STANDARD)
    datasets.Dataset.from_list(TRL_STANDARD).to_parquet(str(tmp_path / "pairs.parquet"))
    columns = PreferenceColumns(label="p")
    expected = [
        tokenize_pair(gpt2, PromptPair(r["prompt"], r["chosen"], r["rejected"], r["p"]), CONFIG)
        for r in TRL_STANDARD
        if r["chosen"] != r["rejected"]
    ]
    for source, split in ((str(tmp_path), "train"), (str(tmp_path / "pairs.parquet"), "anything")):
        pairs, report = load_pairs(load_rows(source, split), columns, "text", gpt2, CONFIG, source)
        assert pairs == expected
        assert (report.total, report.kept, dict(report.dropped)) == (4, 3, {"identical_responses": 1})
    assert [pair.label for pair in expected] == [0.8, 1.0, 0.6]
    assert path.exists()


def test_conversational_fixture_renders_prompts_with_the_chat_template(gpt2: Any) -> None:
    rows = load_rows(str(FIXTURE), "train_prefs")
    columns = PreferenceColumns(prompt=None, label="label")
    pairs, report = load_pairs(rows, columns, "conversational", gpt2, CONFIG, "fixture")
    assert (report.total, report.kept) == (42, 40)
    assert report.dropped == {"prompt_mismatch": 1, "identical_responses": 1}
    first = json.loads((FIXTURE / "train_prefs.jsonl").read_text().splitlines()[0])
    user, answer = first["chosen"]
    assert gpt2.decode(pairs[0].prompt_ids) == f"<|user|>\n{user['content']}<|endoftext|>\n<|assistant|>\n"
    assert gpt2.decode(pairs[0].chosen_ids) == answer["content"] + gpt2.eos_token
    # soft labels reach the batch contract that every method's loss reads
    assert collate_pairs(pairs[:4], gpt2.eos_token_id).label.tolist() == pytest.approx([1.0, 1.0, 0.9, 0.75])


def test_a_multi_turn_prompt_is_every_turn_before_the_last_answer(tmp_path: Path, gpt2: Any) -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Fruit?"}]
    record = {
        "prompt": turns,  # TRL's conversational format with an explicit prompt
        "chosen": [{"role": "assistant", "content": "Apple"}],
        "rejected": [{"role": "assistant", "content": "Rock"}],
    }
    write_jsonl(tmp_path / "train.jsonl", [record])
    [pair], _ = load_pairs(load_rows(str(tmp_path), "train"), PreferenceColumns(), "conversational", gpt2, CONFIG, "x")
    assert gpt2.decode(pair.prompt_ids) == gpt2.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert gpt2.decode(pair.rejected_ids) == "Rock" + gpt2.eos_token


def test_malformed_rows_are_errors_naming_the_row_or_counted_when_skipped(tmp_path: Path, gpt2: Any) -> None:
    records = [*TRL_STANDARD[:2], {"prompt": "x", "chosen": "y", "rejected": "z", "p": 1.5}, TRL_STANDARD[3]]
    rows = load_rows(str(write_jsonl(tmp_path / "bad.jsonl", records)), "train")
    columns = PreferenceColumns(label="p")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 3: label 1\.5 is not a probability in \[0, 1\]"):
        load_pairs(rows, columns, "text", gpt2, CONFIG, str(tmp_path / "bad.jsonl"))
    pairs, report = load_pairs(rows, columns, "text", gpt2, CONFIG, "bad", skip_malformed=True)
    assert len(pairs) == 3 and report.dropped == {"malformed": 1}
    with pytest.raises(DataError, match=r"no column 'question'; its columns: prompt, chosen, rejected, p"):
        load_pairs(rows, PreferenceColumns(prompt="question"), "text", gpt2, CONFIG, "bad")


SHAREGPT = ROOT / "tests" / "data" / "sharegpt_tiny.json"


def test_sharegpt_pairs_read_as_the_same_conversations(gpt2: Any) -> None:
    """LLaMA-Factory's ShareGPT array (a .json file) gives the pairs its UltraFeedback-format twin gives."""
    recipe = yaml.safe_load(TWIN.read_text())
    recipe["task"] = {key: value for key, value in recipe["task"].items() if key != "columns"} | {"format": "sharegpt"}
    task = validate_recipe(recipe, TWIN).recipe.task
    assert task.columns == PreferenceColumns(prompt="conversations")  # the format's own columns when none are named
    recipe["task"]["columns"] = {"rejected": "worse"}
    assert validate_recipe(recipe, TWIN).recipe.task.columns == PreferenceColumns(prompt="conversations", rejected="worse")
    shared, report = load_pairs(load_rows(str(SHAREGPT), "train"), task.columns, "sharegpt", gpt2, CONFIG, "sharegpt")
    columns = PreferenceColumns(prompt=None)
    conversational, _ = load_pairs(load_rows(str(FIXTURE), "train_prefs"), columns, "conversational", gpt2, CONFIG, "uf")
    assert (report.total, report.kept, dict(report.dropped)) == (42, 41, {"identical_responses": 1})
    assert [pair.prompt_ids for pair in shared[:40]] == [pair.prompt_ids for pair in conversational]
    assert [pair.chosen_ids for pair in shared[:40]] == [pair.chosen_ids for pair in conversational]
    first = json.loads(SHAREGPT.read_text())[0]
    assert report.prompts[0] == f"User: {first['conversations'][0]['value']}"  # what a judge reads: no template tokens
    # any other spelling of turns, through a key and role map
    renamed = [
        {
            "chat": [
                {"speaker": {"human": "me", "gpt": "bot"}[turn["from"]], "text": turn["value"]}
                for turn in record["conversations"]
            ],
            "good": [{"speaker": "bot", "text": record["chosen"]["value"]}],
            "bad": [{"speaker": "bot", "text": record["rejected"]["value"]}],
        }
        for record in json.loads(SHAREGPT.read_text())
    ]
    keys = MessageKeys(role="speaker", content="text", roles={"me": "user", "bot": "assistant"})
    rows = __import__("datasets").Dataset.from_list(renamed)
    mapped, _ = load_pairs(
        rows, PreferenceColumns(prompt="chat", chosen="good", rejected="bad"), "conversational", gpt2, CONFIG, "x", messages=keys
    )
    assert mapped == shared


def test_implicit_text_prompts_are_the_shared_beginning_cut_at_a_word(tmp_path: Path, gpt2: Any) -> None:
    records = [
        {"chosen": "Q: Is the sky blue?\nA: yes, it is", "rejected": "Q: Is the sky blue?\nA: yet it is not"},
        {"chosen": "Hello there", "rejected": "Hello there, friend"},  # one side is a prefix of the other
        {"chosen": "abc", "rejected": "abd"},  # no word boundary before they differ
    ]
    rows = load_rows(str(write_jsonl(tmp_path / "train.jsonl", records)), "train", skip_malformed=True)
    pairs, report = load_pairs(rows, PreferenceColumns(prompt=None), "text", gpt2, CONFIG, "implicit")
    assert report.prompts == ["Q: Is the sky blue?\nA:", "Hello"]  # "ye" is never taken into the prompt
    assert [gpt2.decode(pair.chosen_ids) for pair in pairs] == [" yes, it is<|endoftext|>", " there<|endoftext|>"]
    assert [gpt2.decode(pair.rejected_ids) for pair in pairs] == [" yet it is not<|endoftext|>", " there, friend<|endoftext|>"]
    assert dict(report.dropped) == {"no_shared_prompt": 1}


def test_a_split_with_no_usable_pair_is_one_error_with_the_drop_counts(tmp_path: Path, gpt2: Any) -> None:
    rows = load_rows(str(SHAREGPT), "train")
    keep_role_names = MessageKeys(role="from", content="value")  # human/gpt not mapped to user/assistant
    with pytest.raises(DataError) as error:
        load_pairs(
            rows, PreferenceColumns(prompt="conversations"), "conversational", gpt2, CONFIG, "demo.json", messages=keep_role_names
        )
    message = str(error.value)
    assert message.splitlines() == [
        "demo.json: no usable pairs left of 42 rows, dropped:",
        f"  42 no_final_assistant_turn: {DROP_REASONS['no_final_assistant_turn']} (first: the last turn's role is 'gpt')",
    ]
    records = [{"prompt": "x", "chosen": "y", "rejected": "y"}, {"prompt": "x", "chosen": 3, "rejected": "z"}]
    rows = load_rows(str(write_jsonl(tmp_path / "train.jsonl", records)), "train", skip_malformed=True)
    with pytest.raises(
        DataError, match=r"no usable pairs left of 2 rows, dropped:\n  1 identical_responses: .*\n  1 malformed: .*row 2"
    ):
        load_pairs(rows, PreferenceColumns(), "text", gpt2, CONFIG, "t", skip_malformed=True)
    assert set(DROP_REASONS) >= {"identical_responses", "prompt_mismatch", "no_final_assistant_turn", "no_shared_prompt"}


def test_the_wrong_format_names_what_was_found(gpt2: Any) -> None:
    rows = load_rows(str(SHAREGPT), "train")
    with pytest.raises(DataError, match=r"no column 'prompt'; its columns: conversations, chosen, rejected \(ShareGPT-style"):
        load_pairs(rows, PreferenceColumns(), "conversational", gpt2, CONFIG, "demo.json")
    with pytest.raises(
        DataError,
        match=r"row 1: column 'conversations' is a list of 1 item: object with keys 'from', "
        r"'value', not a list of \{role, content\} messages \(ShareGPT-style turns: format: sharegpt\)",
    ):
        load_pairs(rows, PreferenceColumns(prompt="conversations"), "conversational", gpt2, CONFIG, "demo.json")
    with pytest.raises(DataError, match=r"column 'conversations' is a list of 1 item: .*, not text \(ShareGPT-style"):
        load_pairs(rows, PreferenceColumns(prompt="conversations"), "text", gpt2, CONFIG, "demo.json")


def test_conversational_data_needs_a_chat_template(gpt2: Any) -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
    rows = load_rows(str(FIXTURE), "test_prefs")
    with pytest.raises(DataError, match=r"has no chat template.*set task\.chat_template"):
        load_pairs(rows, PreferenceColumns(prompt=None), "conversational", bare, CONFIG, "fixture")


def test_unknown_sources_and_splits_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no split 'dev' there"):
        load_rows(str(FIXTURE), "dev")
    with pytest.raises(DataError, match=r"nowhere/dataset \(not a local file or folder, so read as a hub dataset id\)"):
        load_rows("nowhere/dataset", "train")


def test_hub_datasets_load_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(path: str, name: str | None = None, data_dir: str | None = None, split: str | None = None) -> Any:
        calls.append((path, name, data_dir, split))
        return datasets.Dataset.from_list(TRL_STANDARD)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(load_rows("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")) == 4
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", None, None, "train_prefs")]


def test_batched_tokenization_equals_pair_by_pair_on_hh(gpt2: Any) -> None:
    """The HH task tokenizes through the batched path: the ids, hence every fingerprint, are the same."""
    pairs, _ = load_hh_pairs(str(SHARED / "hh-rlhf"), "helpful-base", "test")
    config = TokenizationConfig(max_length=512, max_prompt_length=256)
    assert tokenize_pairs(pairs, gpt2, config) == [tokenize_pair(gpt2, pair, config) for pair in pairs]


def test_ultrafeedback_twin_trains_and_is_judged_on_its_test_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    data = yaml.safe_load(TWIN.read_text())
    data["task"]["tokenizer"] = str(SHARED / "tokenizers" / "gpt2")
    with serving() as chat:
        data["task"]["evaluation"]["judge"]["base_url"] = chat.base_url
        experiment = select(validate_recipe(data, TWIN), ["method=dpo,expo_compositional"])
        out = run_experiment(experiment, tmp_path, Console(quiet=True))
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [run["method"] for run in runs] == ["sft-reference", "dpo", "expo_compositional"]
    assert all(run["train_pairs"] == 40 and run["eval_pairs"] == 12 for run in runs)
    instructions = [json.loads(line)["instruction"] for line in (ROOT / "tests/data/alpaca_eval_tiny.jsonl").open()]
    judged = next(out.glob("runs/dpo-*/evaluation-*/T0.7/judgments.jsonl")).read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in judged] == instructions
    assert all(json.loads(line)["baseline"] in (ROOT / "tests/data/alpaca_eval_tiny.jsonl").read_text() for line in judged)
    for run in runs:
        assert run["eval"]["eval/n"] == 8 and "eval/lc_win_rate" in run["eval"]
    assert "LC win rate" in (out / "leaderboard.md").read_text()


def test_without_a_test_set_the_judge_reads_the_conversation_not_the_template(gpt2: Any) -> None:
    """The held-out prompts a judge is shown are the conversation as text, untruncated, without chat-template tokens."""
    from expo_bench.sweep.language_model import LanguageModelSweep

    recipe = yaml.safe_load(TWIN.read_text())
    recipe["task"] = {key: value for key, value in recipe["task"].items() if key not in ("columns", "test", "splits")}
    recipe["task"] |= {"format": "sharegpt", "source": str(SHAREGPT), "tokenizer": str(SHARED / "tokenizers" / "gpt2")}
    task = validate_recipe(recipe, TWIN).recipe.task
    tokenizer = task.load_tokenizer()
    sft = task.sft_examples(0, tokenizer, Console(quiet=True))
    data = task.task_data(0, tokenizer, None, sft, Path("unused"), Console(quiet=True))
    shown = LanguageModelSweep._held_out_prompts(data, tokenizer)
    records = json.loads(SHAREGPT.read_text())
    conversations = {
        "\n\n".join(f"{'User' if turn['from'] == 'human' else 'Assistant'}: {turn['value']}" for turn in record["conversations"])
        for record in records
    }
    assert len(shown.prompts) == len(sft.held_out) and set(shown.prompts) <= conversations
    assert not any("<|user|>" in prompt for prompt in shown.prompts)
