"""Scripted HTTP servers for the tests: the far end of a paid model API, on loopback.

A fake stands in only where the real thing can't be had. These stand in for a provider's
HTTP API: real sockets, status codes and headers, so litellm's and the lean path's own
request building, error mapping, retry hints and cost run as they would against the
provider.

- `loopback_http`: any handler on a free loopback port, in a thread of the test process
  (also the OTLP receiver's transport, tests/otlp_receiver.py).
- `ScriptedHTTP`: a chat server in OpenAI's dialect (`.../chat/completions`) and
  Anthropic's (`.../messages`), each known by its route; it records every request and
  answers with an echo unless a failure is scripted for the next request.
- `server_process`: a server run as its own process that prints `READY <port>`
  (benchmarks/openai_stub.py, tests/counting_stub.py), for load a thread in the test
  process would distort.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

# (path, headers with lower-cased names, body) -> (status, headers, body)
Handle = Callable[[str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


@contextmanager
def loopback_http(handle: Handle) -> Iterator[str]:
    """Serves every POST with `handle` while the block runs; yields the base URL.

    Connections are kept alive, as a provider's API keeps them, and cut when the block ends:
    a client's pooled connection must not reach this server's script after it is gone.
    """
    connections: set[socket.socket] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            connections.add(self.connection)

        def finish(self) -> None:
            connections.discard(self.connection)
            super().finish()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, data = handle(self.path, headers, body)
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        for conn in list(connections):
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()


class Request(NamedTuple):
    path: str  # as sent: an absolute URL when it came through a proxy
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]


@dataclass(frozen=True)
class Failure:
    status: int
    message: str
    kind: str
    code: str | None
    headers: dict[str, str] = field(default_factory=dict)


# The provider's dialect, from the end of the request's route.
ROUTES = {"/chat/completions": "openai", "/messages": "anthropic"}


def dialect_of(path: str) -> str | None:
    route = urlsplit(path).path
    return next((d for end, d in ROUTES.items() if route.endswith(end)), None)


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content)
    return content


class ScriptedHTTP:
    """A chat server for both dialects, answering each request from its script.

    Use it as a context manager: it listens while the block runs. Every request is recorded
    in `requests` (what the tests count and compare); a request takes the next scripted
    answer (`say`) or failure (`fail`) if there is one, else it is answered with
    `echo: <last message>`; answers report `usage` tokens; all in the dialect of its route.
    """

    def __init__(self, usage: tuple[int, int] = (1200, 80)) -> None:
        self.usage = usage
        self.script: deque[Failure | str] = deque()
        self.requests: list[Request] = []
        self._stack = ExitStack()
        self.url = ""

    def __enter__(self) -> ScriptedHTTP:
        self.url = self._stack.enter_context(loopback_http(self._handle))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def api_base(self) -> str:
        """The base an OpenAI-compatible client is given."""
        return self.url + "/v1"

    def say(self, text: str) -> None:
        """Script the next unscripted request to be answered with `text`, not an echo."""
        self.script.append(text)

    def fail(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        code: str | None = None,
        **headers: str,
    ) -> None:
        """Script the next unscripted request to fail so (`kind` is the error's type)."""
        kind = kind or {429: "requests", 400: "invalid_request_error"}.get(status, "server_error")
        self.script.append(Failure(status, message, kind, code, headers))

    def _handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict, bytes]:
        body = json.loads(raw)
        self.requests.append(Request(path, headers, body))
        dialect = dialect_of(path)
        if dialect is None:
            status, extra = 404, {}
            payload: dict[str, Any] = {"error": {"message": f"no route {path}"}}
        elif self.script and isinstance(self.script[0], Failure):
            failure = self.script.popleft()
            status, extra, payload = failure.status, failure.headers, _error(dialect, failure)
        else:
            text = self.script.popleft() if self.script else None
            status, extra, payload = 200, {}, self._answer(dialect, body, text)
        return status, {"Content-Type": "application/json", **extra}, json.dumps(payload).encode()

    def _answer(self, dialect: str, body: dict[str, Any], text: str | None) -> dict[str, Any]:
        if text is None:
            text = f"echo: {_text(body['messages'][-1]['content'])}"
        prompt, completion = self.usage
        if dialect == "anthropic":
            return {
                "id": "msg_stub",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": completion},
            }
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def _error(dialect: str, f: Failure) -> dict[str, Any]:
    if dialect == "anthropic":
        return {"type": "error", "error": {"type": f.kind, "message": f.message}}
    return {"error": {"message": f.message, "type": f.kind, "code": f.code}}


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[str]

    def get(self, path: str) -> Any:
        """GET `path` (the server's counters), decoded from JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())


@contextmanager
def server_process(*argv: str) -> Iterator[ServerProcess]:
    """Runs `argv`, a server that prints `READY <port>` once it listens, for the block."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("READY "), line
        yield ServerProcess(f"http://127.0.0.1:{int(line.split()[1])}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
