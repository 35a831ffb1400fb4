"""A scripted, instant OpenAI-compatible chat.completions server for benchmarks.

Why it exists: to compare frameworks on their own overhead, the model must cost
nothing and answer the same way for everyone. This server does just that, on loopback,
with the Python standard library only, so it runs unchanged under our venv and under
the separate venv that holds the paper's package.

The base URL says who is asking and what to script:

    http://127.0.0.1:PORT/<dialect>/<n>/<run>/v1

- `dialect` is `rlms` or `council`: the REPL language the root's code is written in
  (each framework's own functions), or `floor` for plain calls; `depth` (with `n` the
  depth) scripts a tree of Council agents reaching the same 512 leaf calls at any depth.
- `n` is how many sub-calls the root's code fans out.
- `run` is any token; `GET /stats/<run>` returns what that run cost (requests,
  token usage, bytes received), so a harness can check the work was really done.

A request for model `root` is a root turn: the first one (no assistant message yet)
gets code that splits `context` into `n` slices and makes one sub-call per slice,
then answers; a later root turn (the framework did not see the answer) gets code that
only answers, and is counted in `extra_root_turns`. Any other model is a sub-call and
gets a two-word answer at once. Every reply reports token usage (4 characters a token).

It uses a bare asyncio.Protocol rather than an HTTP framework because the fixed point
of a benchmark must cost as little CPU as possible on a shared two-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict

ROOT_MODEL = "root"

RLMS_CODE = """```repl
step = -(-len(context) // {n})
answers = llm_query_batched(["SUB " + context[i * step:(i + 1) * step] for i in range({n})])
answer["content"] = f"{{len(answers)}} answers; first: {{answers[0]}}"
answer["ready"] = True
```"""

RLMS_FINISH = """```repl
answer["content"] = "finished late"
answer["ready"] = True
```"""

COUNCIL_CODE = """```python
step = -(-len(context) // {n})
answers = llm.map(["SUB"] * {n}, contexts=[context[i * step:(i + 1) * step] for i in range({n})])
FINAL(f"{{len(answers)}} answers; first: {{answers[0]}}")
```"""

COUNCIL_FINISH = """```python
FINAL("finished late")
```"""

SCRIPTS = {"rlms": (RLMS_CODE, RLMS_FINISH), "council": (COUNCIL_CODE, COUNCIL_FINISH)}
SUB_ANSWER = "ok done"

# Depth: the same LEAVES leaf calls reached through `depth` levels of Council agents. An
# agent at a level above the last hands FAN pieces of its input to child agents (`rlm.map`),
# each told its level in its prompt; an agent at the last level fans its share out to `llm`.
LEAVES, FAN = 512, 2

DEPTH_SPLIT = """```python
step = -(-len(context) // {fan})
answers = rlm.map(["LEVEL {next}"] * {fan}, contexts=[context[i * step:(i + 1) * step] for i in range({fan})])
FINAL(f"{{sum(int(a.split()[0]) for a in answers)}} answers")
```"""

DEPTH_LEAF = """```python
step = -(-len(context) // {n})
answers = llm.map(["SUB"] * {n}, contexts=[context[i * step:(i + 1) * step] for i in range({n})])
FINAL(f"{{len(answers)}} answers")
```"""


def depth_code(depth: int, messages: list) -> str:
    """The code an agent writes at its level (read from its request) of a `depth`-deep tree."""
    first_user = next((_text_of(m.get("content")) for m in messages if m.get("role") == "user"), "")
    level = 1
    if first_user.startswith("Request: LEVEL "):
        level = int(first_user.split()[2])
    if level < depth:
        return DEPTH_SPLIT.format(fan=FAN, next=level + 1)
    return DEPTH_LEAF.format(n=LEAVES // FAN ** (depth - 1))


def root_code(dialect: str, n: int, first_turn: bool) -> str:
    """The code the scripted root writes, in the dialect of the framework asking."""
    first, finish = SCRIPTS[dialect]
    return first.format(n=n) if first_turn else finish


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class Stats:
    def __init__(self) -> None:
        self.runs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, run: str, **counts: int) -> None:
        r = self.runs[run]
        for k, v in counts.items():
            r[k] += v


def answer(path: str, body: bytes, stats: Stats) -> tuple[int, bytes]:
    """Route one POST; returns (status, JSON body)."""
    parts = path.strip("/").split("/")
    if len(parts) != 6 or parts[3:] != ["v1", "chat", "completions"]:
        return 404, json.dumps({"error": {"message": f"no route {path}"}}).encode()
    dialect, n_text, run = parts[:3]
    try:
        n = int(n_text)
        req = json.loads(body)
        messages = req["messages"]
        model = str(req.get("model", ""))
    except (ValueError, KeyError, TypeError) as e:
        return 400, json.dumps({"error": {"message": f"bad request: {e}"}}).encode()
    prompt_chars = sum(len(_text_of(m.get("content"))) for m in messages)
    if model.endswith(ROOT_MODEL) and dialect == "depth":
        text = depth_code(n, messages)
        first = sum(m.get("role") == "assistant" for m in messages) == 0
        stats.add(run, root=1, extra_root_turns=0 if first else 1)
    elif model.endswith(ROOT_MODEL) and dialect in SCRIPTS:
        first = not any(m.get("role") == "assistant" for m in messages)
        text = root_code(dialect, n, first)
        stats.add(run, root=1, extra_root_turns=0 if first else 1)
    else:
        text = SUB_ANSWER
        stats.add(run, sub=1)
    prompt_tokens = max(1, prompt_chars // 4)
    completion_tokens = max(1, len(text) // 4)
    stats.add(
        run,
        bytes_in=len(body),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
    reply = {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return 200, json.dumps(reply).encode()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


class _Http(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; Content-Length or chunked request bodies."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._one_request():
            pass

    def _one_request(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._chunked(start)
            if body is None:
                return False
            body, used = body
        else:
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < start + length:
                return False
            body, used = bytes(self.buf[start : start + length]), start + length
        del self.buf[:used]
        if method == "GET" and path.startswith("/stats/"):
            status, out = 200, json.dumps(self.stats.runs.get(path[7:], {})).encode()
        elif method == "POST":
            status, out = answer(path, body, self.stats)
        else:
            status, out = (
                404,
                b'{"error": {"message": "POST /<dialect>/<n>/<run>/v1/chat/completions"}}',
            )
        close = headers.get("connection", "").lower() == "close"
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(out)}\r\nConnection: {'close' if close else 'keep-alive'}"
            "\r\n\r\n".encode()
            + out
        )
        if close:
            self.transport.close()
            return False
        return True

    def _chunked(self, pos: int) -> tuple[bytes, int] | None:
        body = bytearray()
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if len(self.buf) < pos + size + 2:
                return None
            body += self.buf[pos : pos + size]
            pos += size + 2
            if size == 0:
                return bytes(body), pos


async def serve(host: str, port: int) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(stats), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument(
        "--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)"
    )
    a = ap.parse_args()
    try:
        asyncio.run(serve(a.host, a.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
