"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the LLM judge's tests, and a stand-in judge
for trying a recipe without a real one: ``python tests/chat_server.py [--port 8000] [--model local-judge]`` answers
every comparison with the longer response (a fixed rule, not a judgment: for plumbing, never for results), or with
``--first-bias b`` the first response in a share b of the answers (a judge with a known position bias)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    """One response the server sends instead of its answer, to the next request that arrives."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": {"message": "scripted"}}'
    sleep: float = 0.0
    trickle: float = 0.0
    """Seconds between the bytes of the body: each read is quick, the whole reply never ends in time."""


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out closed its socket before the scripted slow answer: expected


def first_bias_draw(content: str) -> float:
    """A uniform draw in [0, 1) fixed by the request's text: whether the scripted position bias strikes."""
    return int.from_bytes(hashlib.sha256(content.encode()).digest()[:8], "big") / 2**64


class ChatServer:
    """Answers chat completions like a judge preferring the longer response (prompts with GARBAGE get an
    unparseable answer); ``script`` responses come first, and after ``fail_after`` answers it fails with 500.
    With ``first_bias`` b, a request answers A whatever the responses when its draw (:func:`first_bias_draw`) is
    below b: on a pair judged both ways the response shown first then wins with probability (1 + b) / 2 and the two
    answers agree with probability 1 − b."""

    def __init__(self, port: int = 0, models: tuple[str, ...] = ("local-judge",), first_bias: float = 0.0) -> None:
        self.models = models
        self.first_bias = first_bias
        """What GET /v1/models lists."""
        self.listing: str | None = None
        """What GET /v1/models answers instead of the listing, when set."""
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.script: list[Scripted] = []
        self.fail_after: int | None = None
        self.answered = 0
        self.delay = 0.0
        self.active = self.max_active = 0
        self.httpd = QuietServer(("127.0.0.1", port), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, content: str) -> str:
        """The longer response, on the line the prompt asks for (``<label>: <"A" or "B">``)."""
        match = re.search(r"Response A:\n(.*)\nResponse B:\n(.*)\nFIRST provide", content, re.DOTALL)
        label = re.search(r"^(.+): <\"A\" or \"B\">$", content, re.MULTILINE)
        assert match is not None and label is not None, content
        if "GARBAGE" in content:
            return "Both responses are fine, I cannot pick one."
        a, b = match.groups()
        if first_bias_draw(content) < self.first_bias:
            return f"Comparison: the first one.\n{label.group(1)}: A"
        return f"Comparison: one response is longer.\n{label.group(1)}: {'A' if len(a) > len(b) else 'B'}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path.rstrip("/") == "/v1/models"
                body = json.dumps({"data": [{"id": model, "object": "model"} for model in chat.models]} if found else {})
                body = chat.listing if found and chat.listing is not None else body
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with chat.lock:
                    chat.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": request})
                    chat.active += 1
                    chat.max_active = max(chat.max_active, chat.active)
                    scripted = chat.script.pop(0) if chat.script else None
                    if scripted is None and chat.fail_after is not None and chat.answered >= chat.fail_after:
                        scripted = Scripted(500)
                    elif scripted is None:
                        chat.answered += 1
                if scripted is None:
                    answer = chat.answer(request["messages"][0]["content"])
                    scripted = Scripted(
                        200, body=json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
                    )
                if scripted.status == 401:  # like a careless server, echo the credentials back
                    scripted.body = json.dumps({"error": {"message": f"Incorrect API key: {self.headers.get('Authorization')}"}})
                time.sleep(chat.delay + scripted.sleep)
                with chat.lock:
                    chat.active -= 1
                body = scripted.body.encode()
                self.send_response(scripted.status)
                for name, value in {"Content-Type": "application/json", **scripted.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not scripted.trickle:
                    self.wfile.write(body)
                    return
                for byte in body[:40]:  # bounded: the test's client gives up long before
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(scripted.trickle)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def serving(models: tuple[str, ...] = ("local-judge",), first_bias: float = 0.0) -> Iterator[ChatServer]:
    chat = ChatServer(models=models, first_bias=first_bias)
    thread = threading.Thread(target=chat.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield chat
    finally:
        chat.httpd.shutdown()
        chat.httpd.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="local-judge", help="the model name it serves (recipes' judge.model)")
    parser.add_argument("--first-bias", type=float, default=0.0, help="the share of answers that pick A whatever they see")
    options = parser.parse_args()
    server = ChatServer(options.port, (options.model,), options.first_bias)
    print(f"stand-in judge {options.model!r} on {server.base_url} (prefers the longer response); Ctrl-C stops it")
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.httpd.server_close()
