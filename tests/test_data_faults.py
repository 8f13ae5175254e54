"""Your own preference data, read strictly before anything is written: every fault a user can meet in a file is one
line naming the file, the line and the field (exit 2, no traceback, no sweep left in the store), and the most common
chat shape (a prompt column repeated inside the messages) is read once, never twice."""

from __future__ import annotations

import gzip
import json
import lzma
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SHARED_DATA, needs_shared_data

from expo_bench.cli import main
from expo_bench.lm.preference_data import PreferenceColumns, load_pairs, load_rows
from expo_bench.lm.tokenize import TokenizationConfig

pytestmark = needs_shared_data("tokenizers", "gpt2")

ROOT = Path(__file__).parent.parent
TEMPLATE = "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
TEMPLATE += "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
CONFIG = TokenizationConfig(max_length=48, max_prompt_length=24)


def pairs(count: int = 12) -> list[dict[str, Any]]:
    return [{"prompt": f"Q{i}?", "chosen": f" yes, {i}", "rejected": f" no, {i}"} for i in range(count)]


def conversations(count: int = 12, prompt: str = "Q{i}?") -> list[dict[str, Any]]:
    """``HuggingFaceH4/ultrafeedback_binarized``'s shape: a prompt column, and the user turn inside both sides."""
    return [
        {
            "prompt": f"Q{i}?",
            "chosen": [{"role": "user", "content": prompt.format(i=i)}, {"role": "assistant", "content": f"yes {i}"}],
            "rejected": [{"role": "user", "content": prompt.format(i=i)}, {"role": "assistant", "content": f"no {i}"}],
        }
        for i in range(count)
    ]


def lines(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def cut(compress: Callable[[bytes], bytes]) -> bytes:
    whole = compress(lines(pairs(200)))
    return whole[: len(whole) // 2]


def recipe(tmp_path: Path, source: str, **task: Any) -> Path:
    data = {
        "experiment": "faults",
        "seeds": [0],
        "task": {
            "kind": "preference",
            "source": source,
            "tokenizer": str(SHARED_DATA / "tokenizers" / "gpt2"),
            "tokenization": {"max_length": 48, "max_prompt_length": 24},
            "max_eval_pairs": 4,
            "model": {"tiny": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}},
            **task,
        },
        "train": {"max_epochs": 1, "batch_size": 4, "accelerator": "cpu"},
        "methods": [{"method": "dpo", "params": {"beta": 0.1}}],
    }
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


FAULTS: list[tuple[str, str, bytes, dict[str, Any], str]] = [
    ("empty", "train.jsonl", b"", {}, "train.jsonl: the file holds no records"),
    ("missing", "gone.jsonl", b"", {}, "source 'SOURCE' names a local file or folder, and there is none"),
    ("not utf-8", "train.jsonl", lines(pairs(3)) + b'{"prompt": "\xff"}\n', {}, "train.jsonl, line 4: not UTF-8 text"),
    ("cut gzip", "train.jsonl.gz", cut(gzip.compress), {}, "cannot read past line"),
    ("cut xz", "train.jsonl.xz", cut(lzma.compress), {}, "a compressed file cut short?"),
    ("invalid line", "train.jsonl", lines(pairs(2)) + b'{"prompt": "x",\n', {}, "train.jsonl, line 3: invalid JSON"),
    ("invalid array", "train.json", b'[{"prompt": "x"},\n{]', {}, "train.json, line 2: invalid JSON"),
    (
        "label as text",
        "train.jsonl",
        lines([{**pair, "label": "0.5" if i == 1 else 1.0} for i, pair in enumerate(pairs())]),
        {"columns": {"label": "label"}},
        "train.jsonl, line 2: column 'label' holds text (\"0.5\") where",
    ),
    (
        "template syntax",
        "train.jsonl",
        lines(conversations()),
        {"format": "conversational", "columns": {"prompt": None}, "chat_template": "{% for m in messages %}{{ m"},
        "the chat template (task.chat_template or the tokenizer's) is not valid Jinja",
    ),
    (
        "template raises",
        "train.jsonl",
        lines(conversations()),
        {"format": "conversational", "columns": {"prompt": None}, "chat_template": "{{ raise_exception('no system role') }}"},
        "row 1: the chat template refused this conversation: no system role",
    ),
    (
        "prompt twice",
        "train.jsonl",
        lines(conversations(prompt="another {i}")),
        {"format": "conversational", "chat_template": TEMPLATE},
        "so the prompt would be read twice: where the messages hold the whole conversation, set columns.prompt: null",
    ),
]


@pytest.mark.parametrize(("name", "file", "content", "task", "message"), FAULTS, ids=[fault[0] for fault in FAULTS])
def test_a_data_fault_is_one_line_naming_where_before_anything_runs(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    file: str,
    content: bytes,
    task: dict[str, Any],
    message: str,
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    source = tmp_path / file
    if name != "missing":
        source.write_bytes(content)
    path = recipe(tmp_path, str(source), **task)
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message.replace("SOURCE", str(source)) in err and "Traceback" not in err, err


def test_a_data_fault_met_by_run_leaves_no_sweep_in_the_store(tmp_path: Path) -> None:
    """Through the console script: the file is read before the tracking store is opened."""
    source = tmp_path / "train.jsonl"
    source.write_bytes(lines(pairs(3)) + b"\xff\n")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "expo-bench"), "run", str(recipe(tmp_path, str(source))), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"COLUMNS": "300", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and "line 4: not UTF-8 text" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def gpt2() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "gpt2")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_a_prompt_column_repeated_inside_the_messages_is_read_once(tmp_path: Path, gpt2: Any) -> None:
    """UltraFeedback-binarized's shape with the default ``columns.prompt: prompt`` trains on exactly what
    ``columns.prompt: null`` does (TRL's implicit prompt): the prompt once, and the report says it was repeated."""
    (tmp_path / "uf.jsonl").write_bytes(lines(conversations()))
    rows = load_rows(str(tmp_path / "uf.jsonl"), "train")
    explicit, report = load_pairs(rows, PreferenceColumns(), "conversational", gpt2, CONFIG, "uf")
    implicit, _ = load_pairs(rows, PreferenceColumns(prompt=None), "conversational", gpt2, CONFIG, "uf")
    assert explicit == implicit
    assert gpt2.decode(explicit[0].prompt_ids) == "<|user|>\nQ0?\n<|assistant|>\n"
    assert "12 repeated the prompt at the start of both responses (read once)" in report.summary()

    doubled = [pair | {side: pair["prompt"] + pair[side] for side in ("chosen", "rejected")} for pair in pairs()]
    (tmp_path / "text.jsonl").write_bytes(lines(doubled))
    repeated, _ = load_pairs(load_rows(str(tmp_path / "text.jsonl"), "train"), PreferenceColumns(), "text", gpt2, CONFIG, "t")
    (tmp_path / "plain.jsonl").write_bytes(lines(pairs()))
    plain, _ = load_pairs(load_rows(str(tmp_path / "plain.jsonl"), "train"), PreferenceColumns(), "text", gpt2, CONFIG, "t")
    assert repeated == plain


def test_json_values_keep_their_kind(tmp_path: Path) -> None:
    """The text ``"null"`` stays text (``datasets``' JSON reader makes it missing)."""
    (tmp_path / "train.jsonl").write_bytes(lines([{"prompt": "Q", "chosen": "null", "rejected": "x"}, *pairs(2)]))
    rows = load_rows(str(tmp_path / "train.jsonl"), "train")
    assert rows[0]["chosen"] == "null"
