"""MCP servers as peers: a real MCP server (the SDK's MCPServer, tests/mcp_notes_server.py)
started as a subprocess over stdio, called from an agent's REPL code under the council's
rights, its failures typed, the council going on after the server dies mid-call."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.function import Peers
from agents.mcp import MCPPeer, tool_signature
from agents.models import FunctionModel, ScriptedModel
from channels.errors import BadRequest, CallTimeout, PeerError, Unavailable
from channels.server import running_server
from council.cassette import Cassette
from council.declare import Agent, Council, Function, load_target
from council.mcp import MCP
from council.session import Session, serve
from council.trace import build
from tests.conftest import pid_alive, serving, serving_elsewhere

pytest.importorskip("mcp", reason="MCP peers need the `mcp` extra")
pytestmark = pytest.mark.anyio


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


ROOT = Path(__file__).resolve().parent.parent
SERVER = [sys.executable, str(Path(__file__).with_name("mcp_notes_server.py"))]


def test_json_schemas_read_as_python_signatures():
    schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "limit": {"type": "integer", "default": 10},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mode": {"enum": ["r", "w"]},
            "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["path", "tags"],
    }
    out = {"type": "object", "properties": {"result": {"type": "integer"}}}
    assert tool_signature(schema, out) == (
        "(path: str, tags: list[str], limit: int = 10, mode: Literal['r', 'w'] = None, "
        "n: int | None = None) -> int"
    )
    assert tool_signature({"type": "object"}, None) == "()"
    assert tool_signature(schema, {"type": "object", "properties": {"a": {}}}).endswith("-> dict")
    assert tool_signature({}, {"type": "object", "additionalProperties": {"type": "integer"}}) == (
        "() -> dict[str, int]"
    )


async def test_the_peer_serves_the_tools_and_types_every_failure(nats_server, session_id):
    peer = MCPPeer("notes", SERVER)
    async with serving(nats_server.url, session_id, peer) as bus:
        tools = (await bus.call("notes", "", timeout=60)).value
        by_name = {t["name"]: t for t in tools}
        assert set(by_name) == {"add", "read_note", "stats", "slow", "crash"}
        assert by_name["add"]["signature"] == "(a: int, b: int = 2) -> int"
        assert by_name["add"]["description"] == "Add two integers."

        assert (await bus.call("notes", "add", args={"a": 40})).value == 42
        stats = (await bus.call("notes", "stats", args={"words": ["ab", "cde"]})).value
        assert stats["words"] == 2 and stats["chars"] == 5
        first_pid = stats["pid"]

        with pytest.raises(PeerError, match=r"notes\.read_note failed"):  # the tool's own error
            await bus.call("notes", "read_note", args={"name": "nope"})
        with pytest.raises(BadRequest, match=r"missing 'a'.*\(a: int, b: int = 2\)"):
            await bus.call("notes", "add", args={"b": 1})
        with pytest.raises(BadRequest, match="no argument 'c'"):
            await bus.call("notes", "add", args={"a": 1, "c": 1})
        with pytest.raises(BadRequest, match=r"no tool .delete.*add, read_note"):
            await bus.call("notes", "delete")
        with pytest.raises(PeerError, match="validation error"):  # the server checks values
            await bus.call("notes", "add", args={"a": "not a number"})

        # A call whose deadline passes is a timeout; the server's session stays usable.
        with pytest.raises(CallTimeout):
            await bus.call("notes", "slow", args={"seconds": 30}, timeout=1)
        assert (await bus.call("notes", "stats", args={"words": []})).value["pid"] == first_pid

        # The server dies in the middle of a call: a typed failure, then a fresh server.
        with pytest.raises(Unavailable, match=r"failed during crash.*restarted"):
            await bus.call("notes", "crash", timeout=60)
        assert gone(first_pid)
        again = (await bus.call("notes", "stats", args={"words": ["x"]}, timeout=60)).value
        assert again["words"] == 1 and again["pid"] != first_pid
        assert (await bus.call("notes", "read_note", args={"name": "plan"})).value == (
            "ship on friday"
        )
    assert gone(again["pid"])  # stopping the peer stops its server


async def test_a_server_that_cannot_start_is_unavailable_with_the_reason(nats_server, session_id):
    peer = MCPPeer("ghost", ["/nonexistent/mcp-server"], connect_timeout=20)
    async with serving(nats_server.url, session_id, peer) as bus:
        with pytest.raises(Unavailable, match=r"could not start or reach.*nonexistent"):
            await bus.call("ghost", "anything", timeout=30)


def test_a_declaration_needs_exactly_one_server():
    with pytest.raises(ValueError, match="either command"):
        MCP("files")
    with pytest.raises(ValueError, match="either command"):
        MCP("files", command=["x"], url="http://localhost:1/mcp")
    council = Council(
        entry="chair",
        peers=[Agent("chair", model="m", calls=["files"]), MCP("files", command=["srv"])],
    )
    assert Council.from_json(council.to_json()) == council
    assert "files  mcp  srv" in council.show()
    assert council.edges()["chair"][0] == "files"


CHAIR = """```python
print(notes("add", a=2, b=3))
try:
    notes("read_note", name="missing")
except CallFailed as e:
    print("tool error:", type(e).__name__)
try:
    notes("crash")
except CallFailed as e:
    print("server died:", type(e).__name__)
words = notes("stats", words=context.split())
FINAL({"sum": notes("add", a=20), "words": words["words"], "pid": words["pid"],
       "plan": notes("read_note", name="plan")})
```"""


def chair_model(seen: list[Any], code: str = CHAIR) -> FunctionModel:
    def think(messages: list[dict[str, Any]]) -> str:
        seen.append(messages)
        return code

    return FunctionModel(think)


async def test_an_agent_calls_mcp_tools_from_its_repl_under_rights_and_is_recorded(tmp_path):
    council = Council(
        entry="chair",
        peers=[
            Agent("chair", model="thinker", calls=["notes"]),
            MCP("notes", command=SERVER, description="the team's notes"),
        ],
    )
    seen: list[Any] = []
    cassette = tmp_path / "mcp.jsonl"
    async with Session(council, models={"thinker": chair_model(seen)}, record=cassette) as s:
        assert s.use_rights  # the embedded server enforces the council's edges
        result = await s.ask("count these words", context="one two three four", timeout=120)
    pid = result.value.pop("pid")
    assert result.value == {"sum": 22, "words": 4, "plan": "ship on friday"}
    assert gone(pid)  # the session's end stopped the (restarted) server

    system = seen[0][0]["content"]  # the agent was told each tool with its signature
    assert "notes(tool: str = '', **arguments) -> Any: the team's notes" in system
    assert 'notes("add", ...) with (a: int, b: int = 2) -> int: Add two integers.' in system
    assert 'notes("stats", ...) with (words: list[str]) -> dict' in system

    trace = build(Cassette.load(cassette))
    tool_calls = [n for n in trace.nodes.values() if n.call.callee == "notes"]
    by_tool = {}
    for n in tool_calls:
        by_tool.setdefault(n.call.prompt, []).append(n)
    assert by_tool["add"][0].value == 5 and by_tool["add"][0].call.caller.startswith("chair-repl")
    assert by_tool["read_note"][0].status == "peer_error"
    assert by_tool["crash"][0].status == "unavailable"
    assert by_tool[""][0].call.caller == "admin"  # the session learnt the tools first

    # Replayed with no model able to answer: the model's turns come from the cassette (its
    # system prompt, tools included, matched strictly), the MCP server runs for real.
    def boom(messages: list[dict[str, Any]]) -> str:
        raise AssertionError("a live model was called during a replay")

    fresh = Council.from_json(council.to_json())  # tools not learnt yet: learnt again
    async with Session(
        fresh, models={"thinker": FunctionModel(boom)}, replay=cassette, strict=True
    ) as s:
        again = await s.ask("count these words", context="one two three four", timeout=120)
    assert {k: v for k, v in again.value.items() if k != "pid"} == result.value


def _readme_block(containing: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.+?)\n```", readme, re.S) if containing in b]
    return block


async def test_the_readme_mcp_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # its command is relative
    space: dict[str, Any] = {}
    exec(_readme_block('MCP("notes"'), space)
    code = '```python\nFINAL([notes("read_note", name="plan"), len(notes())])\n```'
    council = Council(entry="chair", peers=[space["chair"], space["notes"]])
    async with Session(council, models={"gpt-4o-mini": ScriptedModel([code], name="m")}) as s:
        result = await s.ask("what is the plan?", timeout=120)
    assert result.value == ["ship on friday", 5]


@pytest.mark.parametrize(("transport", "path"), [("streamable-http", "/mcp"), ("sse", "/sse")])
async def test_a_server_over_http_by_url(nats_server, session_id, transport, path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(  # noqa: ASYNC220 (started once, before any awaiting)
        [*SERVER, transport, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    await anyio.connect_tcp("127.0.0.1", port)
                    break
                except OSError:
                    assert server.poll() is None, server.stderr.read()
                    await anyio.sleep(0.1)
        peer = MCPPeer("notes", f"http://127.0.0.1:{port}{path}")
        async with serving(nats_server.url, session_id, peer) as bus:
            assert (await bus.call("notes", "add", args={"a": 1, "b": 1}, timeout=60)).value == 2
            with pytest.raises(PeerError, match=r"read_note failed"):
                await bus.call("notes", "read_note", args={"name": "nope"})
    finally:
        server.terminate()
        server.wait(timeout=20)


async def asks_notes(prompt: str, peers: Peers) -> int:
    """Adds through the MCP peer."""
    return await peers.notes("add", a=int(prompt), b=1)


async def test_mcp_calls_are_traced_like_any_peer():
    pytest.importorskip("opentelemetry.sdk")
    from tests.otlp_receiver import attributes, otlp_receiver

    council = Council(
        entry="asks_notes",
        peers=[Function(asks_notes, calls=["notes"]), MCP("notes", command=SERVER)],
    )
    with otlp_receiver() as (url, got):
        async with Session(council, telemetry=url) as s:
            result = await s.ask("41", timeout=120)
        spans = got.wait(3)
    assert result.value == 42
    by_name = {sp.name: sp for sp in spans}
    assert set(by_name) == {"list_tools notes", "execute_tool asks_notes", "execute_tool notes.add"}
    tool = by_name["execute_tool notes.add"]
    assert tool.parent_span_id == by_name["execute_tool asks_notes"].span_id
    attrs = attributes(tool)
    assert attrs["gen_ai.tool.name"] == "notes.add" and attrs["council.callee.kind"] == "mcp"
    assert attrs["council.answer"] == "42"


REMOTE = f"""
from council.declare import Agent, Council
from council.mcp import MCP

council = Council(
    entry="chair",
    peers=[Agent("chair", model="thinker", calls=["notes"]), MCP("notes", command={SERVER!r})],
)
"""


async def test_an_mcp_peer_served_by_another_process(tmp_path):
    file = tmp_path / "remote.py"
    file.write_text(REMOTE)
    council = load_target(f"{file}:council")
    session = "mcp" + os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    seen: list[Any] = []
    with (
        running_server() as server,
        serving_elsewhere(f"{file}:council", "notes", server.url, session, env=env),
    ):
        code = '```python\nFINAL(notes("add", a=1, b=1))\n```'
        async with Session(
            council,
            nats_url=server.url,
            session=session,
            local=["chair"],
            models={"thinker": chair_model(seen, code)},
        ) as s:
            assert "notes" not in s.peers  # served by the other process
            result = await s.ask("add", timeout=120)
    assert result.value == 2
    # The tools were learnt over the bus from the other process, before the agent was built.
    assert 'notes("add", ...) with (a: int, b: int = 2) -> int' in seen[0][0]["content"]


async def test_an_agent_served_elsewhere_is_told_the_tools_too():
    """`council serve chair` (session.serve, here in-process) learns the tools of the MCP
    peers the agent calls before building it, as a session does."""
    council = Council(
        entry="chair",
        peers=[Agent("chair", model="thinker", calls=["notes"]), MCP("notes", command=SERVER)],
    )
    served = Council.from_json(council.to_json())  # its own declaration, as in a process
    seen: list[Any] = []
    code = '```python\nFINAL(notes("add", a=5))\n```'
    session = "mcp" + os.urandom(4).hex()
    with running_server() as server:
        async with Session(council, nats_url=server.url, session=session, local=["notes"]) as s:
            async with anyio.create_task_group() as tg:
                await tg.start(
                    partial(
                        serve,
                        served,
                        "chair",
                        nats_url=server.url,
                        session=session,
                        models={"thinker": chair_model(seen, code)},
                    )
                )
                result = await s.ask("add", timeout=120)
                tg.cancel_scope.cancel()
    assert result.value == 7
    assert 'notes("add", ...) with (a: int, b: int = 2) -> int' in seen[0][0]["content"]
