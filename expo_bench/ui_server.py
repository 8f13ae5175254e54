"""``mlflow server`` serving the tracking store read-only: ``python -m expo_bench.ui_server [mlflow server options]``.

MLflow's server has no read-only mode: its REST API creates, edits and deletes runs for anyone who can reach it. This
runs ``mlflow server`` with its ASGI app wrapped in :class:`ReadOnly`, which refuses every request that could write.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MLFLOW_APP = "mlflow.server.fastapi_app:app"
READ_ONLY_APP = "expo_bench.ui_server:read_only_app"

READING_POSTS = ("search", "get-latest-versions")
"""The last path segment of the POST requests that only read (MLflow searches runs, experiments, ... by POST)."""


def reads(method: str, path: str) -> bool:
    """Whether a request only reads: GET, HEAD and OPTIONS, and a POST to a search."""
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and last.startswith(READING_POSTS))


REFUSAL = json.dumps(
    {
        "error_code": "PERMISSION_DENIED",
        "message": "expo-bench ui serves the tracking store read-only (expo-bench ui --allow-writes lets it write)",
    }
).encode()


class ReadOnly:
    """ASGI middleware: requests that could write are answered 403 without reaching the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not reads(scope["method"], scope["path"]):
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(REFUSAL)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": REFUSAL})
            return
        await self.app(scope, receive, send)


def read_only_app() -> ReadOnly:
    """The factory uvicorn calls in the server's worker: MLflow's app behind :class:`ReadOnly`."""
    from mlflow.server.fastapi_app import app

    return ReadOnly(app)


def main(argv: list[str]) -> None:
    """``mlflow server ARGV`` with :func:`read_only_app` as the app its uvicorn serves."""
    import mlflow.server
    from mlflow.cli import cli

    build = mlflow.server._build_uvicorn_command

    def read_only_command(
        options: str | None, host: str, port: int, workers: int, app: str, env_file: str | None = None, is_factory: bool = False
    ) -> list[str]:
        if app != MLFLOW_APP:  # another MLflow wires its server otherwise: refuse rather than serve it writable
            raise RuntimeError(f"mlflow server serves {app}, not {MLFLOW_APP}: cannot make it read-only")
        return list(build(options, host, port, workers, READ_ONLY_APP, env_file, True))

    mlflow.server._build_uvicorn_command = read_only_command
    cli.main(["server", *argv], prog_name="mlflow")


if __name__ == "__main__":
    main(sys.argv[1:])
