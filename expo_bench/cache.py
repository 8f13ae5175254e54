"""A small on-disk cache for work that every method of a sweep shares (reference log-probs, samples)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from expo_bench.distributed import broadcast, is_global_zero

T = TypeVar("T")


def digest(key: dict[str, Any], length: int = 12) -> str:
    """A short sha256 of a JSON-able key, the same for equal content whatever its dict order."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:length]


def cached(directory: Path, name: str, key: dict[str, Any], compute: Callable[[], T]) -> tuple[T, bool]:
    """``compute()``'s value, stored under ``directory/name-<hash of key>.pt``; also whether it was a hit.

    The key must name everything the value depends on (model, data and tokenization fingerprints,
    settings, seed). Writes go through a temporary file, so an interrupted run leaves no half-written entry.

    Across ranks: rank zero decides whether it is a hit, every rank computes a miss (``compute`` may be collective:
    training, sharded sampling) and rank zero alone writes it.
    """
    path = directory / f"{name}-{digest(key, 16)}.pt"
    if broadcast(path.exists()):
        return torch.load(path, weights_only=True), True
    value = compute()
    if not is_global_zero():
        return value, False
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(value, partial)
    partial.replace(path)
    return value, False
