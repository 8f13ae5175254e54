"""``expo-bench data fetch``: the public files the local twins and the tests read (HH-RLHF's test splits, IMDb, the
Pythia and GPT-2 tokenizers), from the Hugging Face hub into one data folder, by default ``../shared/data``, the
folder the shipped recipes name. A file already there is kept."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from expo_bench.errors import UserError

DEFAULT_FOLDER = Path("../shared/data")
"""Relative to the repository root, as the shipped twins name it."""


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository and where it goes in the data folder."""

    repo: str
    path: str
    target: str
    repo_type: str = "model"


HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
FILES = (
    *(
        HubFile("Anthropic/hh-rlhf", f"{subset}/test.jsonl.gz", f"hh-rlhf/{subset}/test.jsonl.gz", "dataset")
        for subset in HH_SUBSETS
    ),
    *(
        HubFile("EleutherAI/pythia-160m", name, f"tokenizers/gpt-neox-20b/{name}")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    ),
    *(
        HubFile("openai-community/gpt2", name, f"tokenizers/gpt2/{name}")
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
    ),
)
"""Files copied as they are."""

IMDB_SPLITS = {"train": 1000, "test": 500}
"""IMDb split → reviews per label in its ``<split>_sample`` file (the twin's and the tests' balanced samples)."""
IMDB_FILES = {
    split: HubFile("stanfordnlp/imdb", f"plain_text/{split}-00000-of-00001.parquet", f"imdb/{split}.jsonl.xz", "dataset")
    for split in IMDB_SPLITS
}
"""IMDb's parquet splits, rewritten as ``{text, label}`` lines."""

Download = Callable[..., str]
"""``huggingface_hub.hf_hub_download``'s signature: (repo_id, filename, repo_type=...) → a local path."""


def _download(download: Download, file: HubFile) -> Path:
    try:
        return Path(download(repo_id=file.repo, filename=file.path, repo_type=file.repo_type))
    except Exception as error:  # the hub client's errors have no common base: offline, 404, gated, network
        raise UserError(
            f"cannot fetch {file.path} of the hub {file.repo_type} {file.repo}: {error}. The hub must be reachable "
            "(HF_HUB_OFFLINE unset)"
        ) from None


def _imdb_records(parquet: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["text", "label"])
    return [{"text": text, "label": int(label)} for text, label in zip(*table.to_pydict().values(), strict=True)]


def _sample(records: list[dict[str, Any]], per_label: int) -> list[dict[str, Any]]:
    """``per_label`` reviews of each label, those with the smallest sha256 of their text (a fixed, unbiased pick)."""
    key: Callable[[dict[str, Any]], str] = lambda record: hashlib.sha256(record["text"].encode()).hexdigest()  # noqa: E731
    return [record for label in (0, 1) for record in sorted((r for r in records if r["label"] == label), key=key)[:per_label]]


def _write_lines(path: Path, records: Iterable[dict[str, Any]], opener: Callable[..., Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with opener(partial, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    partial.replace(path)


def fetch(folder: Path, console: Console, download: Download | None = None) -> list[Path]:
    """Every file the twins and tests read, fetched into ``folder`` where it is missing; the paths written."""
    if download is None:
        from huggingface_hub import hf_hub_download

        download = hf_hub_download
    written = []
    for file in FILES:
        target = folder / file.target
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_download(download, file), target.with_name(target.name + ".partial"))
            target.with_name(target.name + ".partial").replace(target)
            written.append(target)
    for split, per_label in IMDB_SPLITS.items():
        full, sample = folder / IMDB_FILES[split].target, folder / f"imdb/{split}_sample.jsonl.gz"
        if full.exists() and sample.exists():
            continue
        records = _imdb_records(_download(download, IMDB_FILES[split]))
        _write_lines(full, records, lzma.open)
        _write_lines(sample, _sample(records, per_label), gzip.open)
        written += [full, sample]
    console.print(f"{folder}: {len(written)} files fetched, {len(FILES) + 2 * len(IMDB_SPLITS) - len(written)} already there")
    return written
