"""Recording a session to a cassette, and refusing cassettes that cannot be trusted.

The scenario (also used by tests/test_replay.py): a chair asks two critics to check a
draft of 100 parts each; each critic fans out one call per part to an "llm" peer (a
scripted function with random latency, so calls finish out of order); the chair then
asks a scripted "human" whether to ship. 200 model calls, plain bus peers.
"""

from __future__ import annotations

import json
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from channels import subjects
from channels.bus import Bus
from channels.errors import CallFailed
from channels.messages import Call, Reply, Step, Usage
from council.cassette import (
    FORMAT_VERSION,
    Cassette,
    CassetteCorrupt,
    CassetteError,
    CassetteTruncated,
    CassetteVersionError,
)
from council.record import Recorder
from council.trace import build

pytestmark = pytest.mark.anyio

PARTS = 100
DRAFT = [f"paragraph {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(PARTS)]


async def scripted_llm(call: Call) -> Reply:
    await anyio.sleep(random.random() * 0.003)
    words = len(call.prompt.split())
    verdict = "fine" if words % 3 else "too wordy"
    return Reply(
        value=f"{verdict} ({words} words)",
        usage=Usage(input_tokens=words, output_tokens=3, cost=words * 1e-6, model_calls=1),
    )


async def scripted_human(call: Call) -> str:
    return "ship it" if "wordy" in call.prompt else "hold"


@asynccontextmanager
async def first_failure():
    """Pass a sub-call's failure on as itself, not wrapped in an ExceptionGroup."""
    try:
        yield
    except* CallFailed as group:
        raise group.exceptions[0] from None


@dataclass
class Council:
    """The chair and critics, run for real; `tweak` changes one prompt (an agent code edit)."""

    buses: dict[str, Bus]
    tweak: int | None = None
    seen: list[str] = field(default_factory=list)

    def critic(self, name: str):
        bus = self.buses[name]

        async def handler(call: Call) -> Reply:
            parts = json.loads(call.prompt)
            out: list[str] = [""] * len(parts)
            usage = Usage()

            async def check(i: int, part: str) -> None:
                nonlocal usage
                ask = f"{name}: is part {i} clear? {part}"
                if self.tweak == i and name == "critic-b":
                    ask = f"{name}: is part {i} clear and short? {part}"
                reply = await bus.call("llm", ask, parent=call, timeout=30)
                out[i] = reply.value
                usage = usage + reply.usage

            async with first_failure(), anyio.create_task_group() as tg:
                for i, part in enumerate(parts):
                    tg.start_soon(check, i, part)
            return Reply(value=out, usage=usage)

        return handler

    def chair(self):
        bus = self.buses["chair"]

        async def handler(call: Call) -> Reply:
            await bus.publish(Step(session=bus.session, peer="chair", call=call.id, n=1))
            results: dict[str, Reply] = {}

            async def ask(critic: str) -> None:
                results[critic] = await bus.call(critic, json.dumps(DRAFT), parent=call, timeout=60)

            async with first_failure(), anyio.create_task_group() as tg:
                tg.start_soon(ask, "critic-a")
                tg.start_soon(ask, "critic-b")
            wordy = sorted(
                i
                for r in results.values()
                for i, v in enumerate(r.value)
                if v.startswith("too wordy")
            )
            human = await bus.call(
                "human", f"Critics flag parts {wordy[:5]} as too wordy. Ship?", parent=call
            )
            usage = results["critic-a"].usage + results["critic-b"].usage + human.usage
            return Reply(value={"decision": human.value, "wordy": wordy}, usage=usage)

        return handler


async def connect_all(url: str, session: str, names: list[str]) -> dict[str, Bus]:
    return {n: await Bus.connect(url, session=session, name=n) for n in names}


async def run_council(
    url: str,
    session: str,
    *,
    serve_models: bool = True,
    tweak: int | None = None,
    replay_from=None,
) -> Reply:
    """One request to the chair; llm and human served live, or by `replay_from` (a Replayer)."""
    names = ["user", "chair", "critic-a", "critic-b"]
    if serve_models:
        names += ["llm", "human"]
    buses = await connect_all(url, session, names)
    council = Council(buses, tweak=tweak)
    try:
        async with first_failure(), anyio.create_task_group() as tg:
            await tg.start(buses["chair"].serve, "chair", council.chair())
            for c in ("critic-a", "critic-b"):
                await tg.start(buses[c].serve, c, council.critic(c))
            if serve_models:
                await tg.start(buses["llm"].serve, "llm", scripted_llm)
                await tg.start(buses["human"].serve, "human", scripted_human)
            if replay_from is not None:
                async with replay_from.serving(url, session):
                    reply = await buses["user"].call("chair", "review the draft", timeout=60)
            else:
                reply = await buses["user"].call("chair", "review the draft", timeout=60)
            tg.cancel_scope.cancel()
        return reply
    finally:
        for b in buses.values():
            await b.close()


async def record_council(url: str, session: str, path: Path, **kw) -> tuple[Reply, Recorder]:
    nc = (await Bus.connect(url, session=session, name="recorder")).nc
    try:
        async with Recorder(
            nc, session, path, models={"llm": "scripted"}, replay=["llm", "human"], **kw
        ) as rec:
            reply = await run_council(url, session)
    finally:
        await nc.close()
    return reply, rec


@pytest.fixture
async def recorded(nats_server, session_id, tmp_path) -> tuple[Reply, Path]:
    path = tmp_path / "council.jsonl"
    reply, _ = await record_council(nats_server.url, session_id, path)
    return reply, path


# -- recording ----------------------------------------------------------------------------


async def test_records_every_message_of_the_fan_out(nats_server, session_id, tmp_path):
    path = tmp_path / "c.jsonl"
    council = {"peers": ["chair", "critic-a", "critic-b", "llm", "human"], "entry": "chair"}
    reply, rec = await record_council(nats_server.url, session_id, path, council=council)
    summary = rec.summary
    assert summary is not None
    # user->chair, chair->2 critics, 200 llm calls, chair->human
    assert summary.calls == 1 + 2 + 2 * PARTS + 1
    cassette = Cassette.load(path)
    kinds = [e.kind for e in cassette.entries]
    assert kinds.count("call") == summary.calls
    assert kinds.count("reply") == summary.calls  # every call answered, paired by id
    assert kinds.count("event") == 1  # the chair's Step
    assert [e.seq for e in cassette.entries] == list(range(len(cassette.entries)))
    h = cassette.header
    assert h.session == session_id and h.version == FORMAT_VERSION
    assert h.council == council and h.council_digest.startswith("sha256:")
    assert h.models == {"llm": "scripted"} and h.replay == ["llm", "human"]
    interactions = cassette.interactions()
    assert all(isinstance(it.answer, Reply) for it in interactions)
    root = next(it for it in interactions if it.call.callee == "chair")
    assert root.answer.value == reply.value
    assert root.answer.usage.model_calls == 2 * PARTS
    llm_calls = [it for it in interactions if it.call.callee == "llm"]
    assert {it.call.caller for it in llm_calls} == {"critic-a", "critic-b"}
    assert all(it.t_answer >= it.t for it in interactions)
    # the same digest as a second, identical declaration: stable across runs
    rec2 = Recorder(None, session_id, tmp_path / "x.jsonl", council=dict(reversed(council.items())))  # type: ignore[arg-type]
    assert rec2.header.council_digest == h.council_digest


async def test_call_tree_from_parents(recorded):
    _, path = recorded
    trace = build(Cassette.load(path))
    (root,) = trace.roots
    assert (root.call.caller, root.call.callee) == ("user", "chair")
    assert sorted(c.call.callee for c in root.children) == ["critic-a", "critic-b", "human"]
    for critic in (c for c in root.children if c.call.callee.startswith("critic")):
        assert len(critic.children) == PARTS
        assert all(k.call.callee == "llm" and k.status == "ok" for k in critic.children)
    assert trace.totals()["model_calls"] == 2 * PARTS
    assert trace.nodes[root.call.id].events[0]["type"] == "step"


async def test_large_messages_go_beside_the_cassette(nats_server, session_id, tmp_path, connect):
    path = tmp_path / "big.jsonl"
    server, client = await connect("echo"), await connect("client")
    big = "x" * 200_000

    async def echo(call: Call) -> str:
        return call.prompt[::-1]

    rec_bus = await connect("recorder")
    async with Recorder(rec_bus.nc, session_id, path, inline_limit=10_000) as rec:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "echo", echo)
            await client.call("echo", big)
            await client.call("echo", "small")
            tg.cancel_scope.cancel()
    assert rec.summary.entries == 4
    assert path.stat().st_size < 10_000  # the 200 kB call and reply are not inline
    cassette = Cassette.load(path)
    blobs = [e for e in cassette.entries if e.blob]
    assert len(blobs) == 2 and all(e.msg is None for e in blobs)
    assert len(list(cassette.blobs_dir.iterdir())) == 2
    call = cassette.message(blobs[0])
    assert isinstance(call, Call) and call.prompt == big
    # a missing value file is refused up front, naming the folder
    next(cassette.blobs_dir.iterdir()).unlink()
    with pytest.raises(CassetteCorrupt, match="missing from"):
        Cassette.load(path)


async def test_garbage_on_the_bus_is_not_recorded(nats_server, session_id, tmp_path, connect):
    """A malformed request is refused by the peer; the cassette stays loadable."""
    path = tmp_path / "g.jsonl"
    server, client, rb = await connect("echo"), await connect("client"), await connect("rec")

    async def echo(call: Call) -> str:
        return call.prompt

    async with Recorder(rb.nc, session_id, path) as rec:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "echo", echo)
            await client.nc.request(
                subjects.call(session_id, "echo", "client"), b"\x00garbage", timeout=5
            )
            await client.nc.request(
                subjects.call(session_id, "echo", "client"), b'{"a": 1}', timeout=5
            )
            await client.call("echo", "fine")
            tg.cancel_scope.cancel()
    # the two unreadable requests are left out (their bad_request answers are kept)
    assert rec.summary.dropped == 2
    cassette = Cassette.load(path)
    assert [e.kind for e in cassette.entries].count("call") == 1
    assert len(cassette.interactions()) == 1


async def test_a_re_sent_call_is_one_interaction(nats_server, session_id, tmp_path, connect):
    """The bus re-sends a call with its id (reconnect, a silent callee): the cassette holds
    both copies, and reading it gives one call with its answer, not a second one unanswered."""
    path = tmp_path / "resent.jsonl"
    server, client, rb = await connect("echo"), await connect("client"), await connect("rec")

    async def echo(call: Call) -> str:
        return call.prompt

    async with Recorder(rb.nc, session_id, path):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "echo", echo)
            call = client.make_call("echo", "twice")
            data = call.model_dump_json(by_alias=True).encode()
            for _ in range(2):
                await client.nc.request(
                    subjects.call(session_id, "echo", "client"), data, timeout=5
                )
            tg.cancel_scope.cancel()
    cassette = Cassette.load(path)
    assert [e.kind for e in cassette.entries].count("call") == 2
    (only,) = cassette.interactions()
    assert only.call.id == call.id and only.answer is not None and only.answer.value == "twice"


# -- refusing bad cassettes ---------------------------------------------------------------


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


async def test_truncated_cassette_is_refused(recorded, tmp_path):
    _, path = recorded
    lines = _lines(path)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(lines[:50]) + b"\n")  # a recorder that died: no end record
    with pytest.raises(CassetteTruncated, match=r"truncated: it has no end record.*re-record"):
        Cassette.load(cut)
    half = tmp_path / "half.jsonl"
    half.write_bytes(b"\n".join(lines[:50]) + b"\n" + lines[50][: len(lines[50]) // 2])
    with pytest.raises(CassetteTruncated, match="cut off mid-record"):
        Cassette.load(half)
    # a trace of a crashed session may still read what is there
    partial = Cassette.load(half, allow_incomplete=True)
    assert len(partial.entries) == 49 and not partial.complete
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(CassetteTruncated, match="empty"):
        Cassette.load(empty)


async def test_garbled_cassette_is_refused(recorded, tmp_path):
    _, path = recorded
    lines = _lines(path)
    bad = tmp_path / "bad.jsonl"

    garbled = list(lines)
    garbled[20] = garbled[20][:30] + b"\xff\x00##" + garbled[20][34:]
    bad.write_bytes(b"\n".join(garbled))
    with pytest.raises(CassetteCorrupt, match=r"line 21 is not JSON.*--council-record"):
        Cassette.load(bad)

    edited = list(lines)  # valid JSON, changed content: the digest catches it
    n = next(i for i, line in enumerate(lines) if b"clear?" in line)
    edited[n] = edited[n].replace(b"clear?", b"CLEAR?", 1)
    bad.write_bytes(b"\n".join(edited))
    with pytest.raises(CassetteCorrupt, match="does not match its recorded digest"):
        Cassette.load(bad)

    dropped = lines[:10] + lines[11:]
    bad.write_bytes(b"\n".join(dropped))
    with pytest.raises(CassetteCorrupt, match="says it holds"):
        Cassette.load(bad)

    wrong_shape = list(lines)
    wrong_shape[5] = b'{"kind": "call", "seq": "five"}'
    bad.write_bytes(b"\n".join(wrong_shape))
    with pytest.raises(CassetteCorrupt, match="line 6 is not a valid entry record"):
        Cassette.load(bad)

    bad.write_bytes(b"hello, not a cassette\n")
    with pytest.raises(CassetteCorrupt, match="not a council cassette"):
        Cassette.load(bad)
    bad.write_bytes(b'{"some": "json"}\n')
    with pytest.raises(CassetteCorrupt, match="not a council cassette"):
        Cassette.load(bad)
    with pytest.raises(CassetteError, match="no cassette at"):
        Cassette.load(tmp_path / "nowhere.jsonl")


async def test_other_format_version_is_refused(recorded, tmp_path):
    _, path = recorded
    lines = _lines(path)
    header = json.loads(lines[0])
    header["version"] = FORMAT_VERSION + 1
    header["framework"] = "9.9.9"
    newer = tmp_path / "newer.jsonl"
    newer.write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1:]]))
    with pytest.raises(CassetteVersionError) as err:
        Cassette.load(newer)
    msg = str(err.value)
    assert f"format version {FORMAT_VERSION + 1}" in msg and "9.9.9" in msg
    assert f"reads version {FORMAT_VERSION}" in msg and "--council-record" in msg
    assert isinstance(err.value, CassetteError)
    header = json.loads(lines[0])
    header["messages"] = 99  # same cassette format, messages from another bus schema
    newer.write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1:]]))
    with pytest.raises(CassetteVersionError, match="messages of schema version 99"):
        Cassette.load(newer)


async def test_header_from_a_council_declaration(tmp_path):
    from council.declare import LLM, Agent, Council, Human

    council = Council(
        entry="chair",
        model="openai/gpt-4o-mini",
        peers=[
            Agent("chair", calls=["critic", "llm", "boss"]),
            Agent("critic", calls=["llm"], model="openai/gpt-4o"),
            LLM("llm"),
            Human("boss"),
        ],
    )
    rec = Recorder(None, "s1", tmp_path / "c.jsonl", council=council)  # type: ignore[arg-type]
    h = rec.header
    assert h.council_digest == council.digest and h.council["entry"] == "chair"
    assert h.replay == ["chair-model", "critic-model", "llm", "boss"]
    assert h.models == {
        "chair-model": "openai/gpt-4o-mini",
        "critic-model": "openai/gpt-4o",
        "llm": "openai/gpt-4o-mini",
    }
