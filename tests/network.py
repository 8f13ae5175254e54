"""Loopback helpers shared by the tests that start servers or distributed ranks."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on once the probe is closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
