"""Test-wide settings: no hub access (calls fail at once instead of retrying), quiet TRL experimental imports; and
where the shared data lives, with the skip every test that needs it takes when it is absent."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

SHARED_DATA = Path(__file__).parent.parent.parent / "shared" / "data"
"""The data folder the shipped twins name (``../shared/data`` from the repository root)."""
FETCH = "expo-bench data fetch"


def missing(path: Path) -> str:
    """Why a test skips: the path it needs and the command that fetches it."""
    return f"needs {path}: run `{FETCH}` (online) to fetch it"


def needs_shared_data(*parts: str) -> pytest.MarkDecorator:
    """Skip unless the shared data folder (or the file or folder ``parts`` under it) is there, saying how to get it."""
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=missing(path))


def require_shared_data(*parts: str) -> Path:
    """The shared data path ``parts``; inside a test or fixture, a skip saying how to fetch it when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(missing(path))
    return path
