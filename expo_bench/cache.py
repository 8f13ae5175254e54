"""A small on-disk cache for work that every method of a sweep shares (reference log-probs, samples), and the file
primitives every writer of the results folder uses: atomic writes and cross-process locks."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock, Timeout

from expo_bench.distributed import broadcast, is_global_zero
from expo_bench.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it


def digest(key: dict[str, Any], length: int = 12) -> str:
    """A short sha256 of a JSON-able key, the same for equal content whatever its dict order."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:length]


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write ``path`` whole or not at all: ``data`` (or what ``data(temporary)`` writes) goes to a uniquely named
    temporary file beside it, then an atomic rename, so concurrent writers and crashes never leave (or let anyone
    read) a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    temporary = Path(name)
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)  # as open() would create it, not mkstemp's owner-only mode
        with os.fdopen(handle, "wb") as file:
            if not callable(data):
                file.write(data.encode() if isinstance(data, str) else data)
        if callable(data):
            data(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def locked(path: Path, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` (exclusive across processes); say so when another process holds it and wait, at most
    ``timeout`` seconds (forever when None), then :class:`UserError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        limit = "" if timeout is None else f" (at most {timeout:g} s)"
        log.warning("waiting for %s: another process holds %s%s", what, path, limit)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise UserError(f"{what}: another process held {path} for {timeout:g} s; is it still running?") from None
    try:
        yield
    finally:
        lock.release()


def unsafe_file(path: Path, error: pickle.UnpicklingError) -> UserError:
    """What ``torch.load(..., weights_only=True)`` refusing a file means to the user."""
    return UserError(
        f"refusing to load {path}: it holds more than tensors and plain data, so loading it could run code "
        f"({str(error).splitlines()[0]}); delete it if you did not put it there"
    )


def cached(directory: Path, name: str, key: dict[str, Any], compute: Callable[[], T]) -> tuple[T, bool]:
    """``compute()``'s value, stored under ``directory/name-<hash of key>.pt``; also whether it was a hit.

    The key must name everything the value depends on (model, data and tokenization fingerprints, settings, seed).
    Entries load with ``weights_only=True`` (tensors and plain data: a planted file cannot run code) and are written
    atomically under a lock; two processes computing one entry both get the value, the first one written is kept.

    Across ranks: rank zero decides whether it is a hit, every rank computes a miss (``compute`` may be collective:
    training, sharded sampling) and rank zero alone writes it; the lock is not held while computing.
    """
    path = directory / f"{name}-{digest(key, 16)}.pt"
    if broadcast(path.exists()):
        try:
            return torch.load(path, weights_only=True), True
        except pickle.UnpicklingError as error:
            raise unsafe_file(path, error) from None
    value = compute()
    if not is_global_zero():
        return value, False
    with locked(path.with_name(f".{path.name}.lock"), f"the cache entry {path.name}"):
        if not path.exists():
            buffer = io.BytesIO()
            torch.save(value, buffer)
            atomic_write(path, buffer.getvalue())
    return value, False


def number(value: object) -> float:
    """``value`` if it is a JSON number (NaN and infinities included: a diverged metric is recorded as such)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {str(value)[:40]!r}")
    return float(value)


def integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {str(value)[:40]!r}")
    return value


def metrics(values: object) -> dict[str, float]:
    """Stored metrics: names to numbers."""
    if not isinstance(values, dict):
        raise TypeError(f"expected metrics (name: number), got {str(values)[:40]!r}")
    return {str(name): number(value) for name, value in values.items()}


def read_json(path: Path, parse: Callable[[Any], T]) -> T:
    """``parse`` of the JSON file ``path``, which this program wrote (so a failure means it was damaged or edited):
    :class:`UserError` naming the file and what is wrong."""
    try:
        return parse(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, LookupError, TypeError, AttributeError, RecursionError) as error:
        problem = f"{type(error).__name__}: {error}" if isinstance(error, LookupError) else str(error)
        raise UserError(f"{path}: damaged or edited ({problem[:200]}); delete it to compute it again") from None


SEAL = ".sha256"
"""The ending of a sealed file's digest, kept beside it."""


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def sealed_write(path: Path, text: str) -> None:
    """:func:`atomic_write` of ``text`` with its sha256 written beside it first (so a file present is always sealed):
    :func:`check_seal` then refuses the file once anything changed it."""
    data = text.encode()
    atomic_write(path.with_name(path.name + SEAL), hashlib.sha256(data).hexdigest())
    atomic_write(path, data)


def check_seal(path: Path) -> None:
    """:class:`UserError` if ``path`` changed since :func:`sealed_write` wrote it (a file written before seals were
    kept has none and passes)."""
    seal = path.with_name(path.name + SEAL)
    if seal.exists() and file_sha256(path) != seal.read_text().strip():
        raise UserError(
            f"{path}: edited or damaged since it was written (its sha256 is not the one in {seal.name}); delete it (and "
            f"{seal.name}) to compute it again"
        )
