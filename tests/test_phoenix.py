"""Tracing into a real OpenTelemetry backend: Arize Phoenix, started here (offline), receives
a session's spans over OTLP/HTTP and shows them as one trace, read back from its REST API.

Phoenix is a server, so it lives in a venv of its own (its dependencies pull openai>=3,
which the `local` extra refuses): .ci/run makes `.venv-phoenix` and points COUNCIL_PHOENIX
at its `phoenix` command, and there this test must run (COUNCIL_REQUIRE_PHOENIX=1).
Elsewhere it runs when `phoenix` is found and otherwise skips, saying how to get it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.function import Peers
from agents.models import ScriptedModel
from council.declare import Agent, Council, Function
from council.session import Session
from council.telemetry import span_id

pytestmark = [pytest.mark.anyio, pytest.mark.otel_backend]

HOW = (
    "python3 -m venv .venv-phoenix && .venv-phoenix/bin/pip install arize-phoenix, then "
    "COUNCIL_PHOENIX=.venv-phoenix/bin/phoenix"
)


def _phoenix_command() -> str:
    found = os.environ.get("COUNCIL_PHOENIX") or shutil.which("phoenix")
    if found and Path(found).exists():
        return found
    if os.environ.get("COUNCIL_REQUIRE_PHOENIX"):
        pytest.fail(f"Arize Phoenix is required here and was not found: {HOW}", pytrace=False)
    pytest.skip(f"Arize Phoenix is not installed ({HOW})")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory) -> Iterator[str]:
    command = _phoenix_command()
    port, grpc = _port(), _port()
    work = tmp_path_factory.mktemp("phoenix")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OTEL_"))},
        "PHOENIX_WORKING_DIR": str(work),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (work / "phoenix.log").open("w")
    proc = subprocess.Popen(
        [command, "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    try:
        while True:
            try:
                _get(f"{url}/v1/projects")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - began > 180:
                    pytest.fail(
                        "Phoenix did not start:\n" + Path(log.name).read_text()[-3000:],
                        pytrace=False,
                    )
                time.sleep(0.5)
        print(f"\nphoenix ready in {time.monotonic() - began:.1f}s at {url}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def words(text: str) -> int:
    """Counts words."""
    return len(text.split())


async def scribe(prompt: str, peers: Peers) -> str:
    """Counts, then reports."""
    return f"{await peers.words(prompt)} words"


CHAIR = """```python
print(scribe("four words in here"))
FINAL(scribe("two words"))
```"""


async def test_phoenix_shows_a_session_as_one_trace(phoenix):
    council = Council(
        entry="chair",
        peers=[
            Agent("chair", model="thinker", calls=["scribe"]),
            Function(scribe, calls=["words"]),
            Function(words),
        ],
    )
    model = ScriptedModel([CHAIR], name="thinker", usage=(200, 40), cost=0.003)
    async with Session(council, models={"thinker": model}, telemetry=phoenix) as s:
        result = await s.ask("count", timeout=60)
    assert result.value == "2 words"
    root = result.call_id

    deadline = time.monotonic() + 60
    spans: list[dict[str, Any]] = []
    needed = ["invoke_agent chair", "chat thinker", "repl exec chair", *["execute_tool words"] * 2]
    while time.monotonic() < deadline:  # Phoenix ingests in the background
        try:
            spans = _get(f"{phoenix}/v1/projects/council/spans?limit=100")["data"]
        except urllib.error.HTTPError as e:  # 404 until the first span made the project
            if e.code != 404:
                raise
            spans = []
        names = [s["name"] for s in spans if s["context"]["trace_id"] == root]
        if all(names.count(n) >= needed.count(n) for n in needed):
            break
        await anyio.sleep(0.5)
    mine = [s for s in spans if s["context"]["trace_id"] == root]
    names = sorted(s["name"] for s in mine)
    # admin -> chair, chair -> model, chair -> repl (exec), two scribe calls each calling words
    assert names == sorted(
        [
            "invoke_agent chair",
            "chat thinker",
            "repl exec chair",
            "execute_tool scribe",
            "execute_tool scribe",
            "execute_tool words",
            "execute_tool words",
        ]
        + [n for n in names if n.startswith("repl ") and n != "repl exec chair"]
    ), names
    by_id = {s["context"]["span_id"]: s for s in mine}
    top = [s for s in mine if s["parent_id"] is None]
    assert len(top) == 1 and top[0]["context"]["span_id"] == f"{span_id(root):016x}"
    for s in mine:  # one tree: every other span's parent is in the same trace
        assert s["parent_id"] is None or s["parent_id"] in by_id, s["name"]
    for s in mine:
        if s["name"] == "execute_tool words":
            assert by_id[s["parent_id"]]["name"] == "execute_tool scribe"

    chat = next(s for s in mine if s["name"] == "chat thinker")
    assert chat["span_kind"] == "LLM"  # Phoenix reads it as a model call
    attrs = chat["attributes"]
    assert attrs["gen_ai.request.model"] == "thinker"
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (200, 40)
    assert attrs["llm.token_count.prompt"] == 200 and attrs["llm.token_count.completion"] == 40
    assert attrs["gen_ai.usage.cost"] == pytest.approx(0.003)
    agent = by_id[f"{span_id(root):016x}"]
    assert agent["span_kind"] == "AGENT" and agent["status_code"] != "ERROR"
