"""Test-wide settings: no hub access (calls fail at once instead of retrying), quiet TRL experimental imports."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
