"""Where work outside the Trainer runs: the device for one-off passes (reference log-probs, sampling, scoring)."""

from __future__ import annotations

import torch


def accelerator_device() -> torch.device:
    """A GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
