"""``expo-bench ui`` serves the tracking store read-only unless asked, and warns when it listens beyond this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from network import free_port

from expo_bench import tracking
from expo_bench.ui_server import reads


def post(url: str, body: dict[str, object]) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize(("host", "allow_writes", "create_status"), [("0", False, 403), ("127.0.0.1", True, 200)])
def test_the_ui_is_read_only_unless_asked_and_warns_beyond_loopback(
    tmp_path: Path, host: str, allow_writes: bool, create_status: int
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    client = tracking.open_client(f"sqlite:///{results / 'mlflow.db'}")
    experiment_id = client.create_experiment("exp")
    port = free_port()
    command = [str(Path(sys.executable).parent / "expo-bench"), "ui", "--results", str(results), "--port", str(port)]
    ui = subprocess.Popen(
        [*command, "--host", host, *(["--allow-writes"] if allow_writes else [])],
        cwd=tmp_path,
        env={**{key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}, "COLUMNS": "300"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches it as at a terminal, even where the suite runs in the background (which ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.monotonic() + 60
        while True:  # searching (a POST) reads, and is served
            assert ui.poll() is None and time.monotonic() < deadline, ui.communicate()
            try:
                if post(f"{api}/runs/search", {"experiment_ids": [experiment_id]}) == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert post(f"{api}/runs/create", {"experiment_id": experiment_id}) == create_status
        if create_status == 403:
            assert post(f"{api}/experiments/delete", {"experiment_id": experiment_id}) == 403
        with urllib.request.urlopen(f"{api}/experiments/get?experiment_id={experiment_id}", timeout=5) as response:
            assert response.status == 200  # reading goes on
    finally:
        ui.send_signal(signal.SIGINT)
        _, err = ui.communicate(timeout=60)
    warned = "warning: listening on '0', beyond this machine: anyone who can reach it can browse the tracking store (read-only)"
    assert (warned in " ".join(err.split())) == (host == "0"), err
    runs = client.search_runs([experiment_id])
    assert len(runs) == (0 if create_status == 403 else 1)


@pytest.mark.parametrize(
    ("method", "path", "read"),
    [
        ("GET", "/api/2.0/mlflow/runs/get", True),
        ("HEAD", "/", True),
        ("POST", "/ajax-api/2.0/mlflow/runs/search", True),
        ("POST", "/ajax-api/2.0mlflow/experiments/search-datasets", True),
        ("POST", "/api/2.0/mlflow/registered-models/get-latest-versions", True),
        ("POST", "/api/2.0/mlflow/runs/create", False),
        ("POST", "/ajax-api/2.0/mlflow/runs/log-batch", False),
        ("DELETE", "/api/2.0/mlflow-artifacts/artifacts/x", False),
        ("PATCH", "/api/2.0/mlflow/traces/1", False),
        ("POST", "/v1/traces", False),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/x", False),
    ],
)
def test_only_requests_that_read_pass(method: str, path: str, read: bool) -> None:
    assert reads(method, path) is read
