"""Batched fan-out: a `.map` sends its calls to one peer a batch per message, and the callee,
the recorder and every listener treat each item exactly as a call sent alone."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import nats
import pytest

from agents.models import FunctionModel
from agents.prompt import PeerSpec
from agents.repl.host import Repl
from channels import subjects
from channels.bus import Bus
from channels.errors import CallTimeout, PeerError, Unavailable
from channels.messages import (
    Addressed,
    Batch,
    Call,
    Failure,
    Ref,
    Reply,
    Working,
    decode,
    encode,
    unbatched,
)
from council.cassette import Cassette
from council.declare import LLM, Agent, Council
from council.events import CallStarted, Translator
from council.progress import watch
from council.session import Session
from tests.test_repl import serving
from tests.test_session_replay import tree

pytestmark = pytest.mark.anyio


class Wire:
    """Every message on a peer's call subject, seen by a plain NATS connection."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    @property
    def calls(self) -> list[Call]:
        return [c for m in self.messages for c in unbatched(decode(m)) if isinstance(c, Call)]

    @property
    def batches(self) -> list[Batch]:
        return [b for m in self.messages if isinstance(b := decode(m), Batch)]


@asynccontextmanager
async def wire(url: str, session: str, callee: str) -> AsyncIterator[Wire]:
    seen = Wire()
    nc = await nats.connect(url)

    async def on_msg(msg: Any) -> None:
        seen.messages.append(msg.data)

    await nc.subscribe(subjects.call(session, callee, subjects.ANY), cb=on_msg)
    await nc.flush()
    try:
        yield seen
    finally:
        await nc.flush()
        await nc.drain()


async def gather_sends(bus: Bus, calls: list[Call]) -> list[Any]:
    """Send `calls` batched, all in one loop turn (as a fan-out does): answers or errors."""
    return await asyncio.gather(*(bus.send(c, batched=True) for c in calls), return_exceptions=True)


# -- on the wire -------------------------------------------------------------------------------


async def test_a_300_item_map_travels_in_a_handful_of_messages(connect, nats_server, session_id):
    async def upper(call: Call) -> str:
        return call.prompt.upper()

    bus, peer = await connect("chair"), await connect("llm")
    async with (
        wire(nats_server.url, session_id, "llm") as seen,
        serving(peer, "llm", upper),
        Repl(bus, agent="chair", peers=[PeerSpec("llm")]) as repl,
    ):
        result = await repl.execute("out = llm.map([f'p{i}' for i in range(300)])\nout")
        assert result.status == "ok", result.for_model()
        assert result.value == repr([f"P{i}" for i in range(300)])
        single = await repl.execute("llm('alone')")
        assert single.value == "'ALONE'"
    calls = seen.calls
    assert sorted(c.prompt for c in calls) == sorted([f"p{i}" for i in range(300)] + ["alone"])
    sizes = [len(unbatched(decode(m))) for m in seen.messages]
    assert len(sizes) <= 20, sizes  # a handful (5 + the single call when idle), not 301
    assert max(len(b.calls) for b in seen.batches) > 1
    assert decode(seen.messages[-1]) == next(c for c in calls if c.prompt == "alone")  # alone


async def test_an_item_over_the_byte_budget_goes_alone_and_big_contexts_are_spilled(connect):
    seen: dict[str, Any] = {}

    async def sizes(call: Call) -> int:
        seen[call.prompt] = call.context
        ctx = call.context
        return -1 if isinstance(ctx, Ref) else len(ctx or "")

    server, client = await connect("sizer"), await connect("client")
    contexts = {
        "small": 10,
        "big": 220_000,  # over a batch's 200 kB, under the 256 kB spill threshold
        "small2": 10,
        "medium": 150_000,
        "medium2": 150_000,
        "huge": 400_000,  # spilled to the store, then small enough to share a batch
        "small3": 10,
    }
    calls = [client.make_call("sizer", p, context="x" * n) for p, n in contexts.items()]
    async with (
        wire(client.nc.connected_url.geturl(), client.session, "sizer") as w,
        serving(server, "sizer", sizes),
    ):
        answers = await gather_sends(client, calls)
    assert [a.value for a in answers] == [-1 if n > 300_000 else n for n in contexts.values()]
    assert isinstance(seen["huge"], Ref) and seen["huge"].size == 400_000
    assert sorted(c.prompt for c in w.calls) == sorted(contexts)
    alone = [m for m in map(decode, w.messages) if isinstance(m, Call)]
    assert "big" in [c.prompt for c in alone]  # a message of its own
    assert w.batches and all(len(b.calls) > 1 for b in w.batches)
    assert all(len(encode(b)) <= 200 * 1024 + 4096 for b in w.batches)
    assert not any(c.prompt == "huge" and not isinstance(c.context, Ref) for c in w.calls)


# -- the callee takes each item as if it came alone ---------------------------------------------


async def test_one_failing_item_fails_only_that_item_with_its_typed_error(connect):
    async def picky(call: Call) -> Any:
        if call.prompt == "boom":
            raise ValueError("no booms")
        if call.prompt == "slow":
            await anyio.sleep(30)
        return call.prompt

    server, client = await connect("picky"), await connect("client")
    calls = [client.make_call("picky", p) for p in ("a", "boom", "b")]
    calls.append(client.make_call("picky", "slow", timeout=1.0))
    calls.append(client.make_call("picky", "c"))
    async with (
        wire(client.nc.connected_url.geturl(), client.session, "picky") as w,
        serving(server, "picky", picky),
    ):
        answers = await gather_sends(client, calls)
    assert len(w.messages) == 1 and len(w.batches[0].calls) == 5  # one message, five calls
    assert [getattr(a, "value", None) for a in answers] == ["a", None, "b", None, "c"]
    assert isinstance(answers[1], PeerError) and "no booms" in answers[1].message
    assert answers[1].call_id == calls[1].id
    assert isinstance(answers[3], CallTimeout) and answers[3].call_id == calls[3].id


async def test_the_callees_concurrency_limit_holds_across_a_batch(connect):
    active = peak = 0

    async def narrow(call: Call) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await anyio.sleep(0.02)
        active -= 1
        return int(call.prompt)

    server, client = await connect("narrow"), await connect("client")
    calls = [client.make_call("narrow", str(i)) for i in range(40)]
    async with (
        wire(client.nc.connected_url.geturl(), client.session, "narrow") as w,
        serving(server, "narrow", narrow, concurrency=3),
    ):
        answers = await gather_sends(client, calls)
    assert [a.value for a in answers] == list(range(40))
    assert len(w.messages) == 1  # all forty in one batch
    assert peak == 3


async def test_a_batch_to_a_peer_nobody_serves_fails_every_item_unavailable_at_once(connect):
    plain = await connect("client")
    # Heartbeats 20 s apart: an item not told at once would wait that long to be re-sent.
    client = Bus(plain.nc, session=plain.session, name="client", heartbeat=20)
    calls = [client.make_call("ghost", str(i), timeout=30) for i in range(5)]
    with anyio.fail_after(8):  # not the 30 s timeout, nor a 20 s heartbeat
        answers = await gather_sends(client, calls)
    assert all(isinstance(a, Unavailable) for a in answers), answers
    assert all("no peer named 'ghost'" in a.message for a in answers)


async def test_cancelling_a_batched_fan_out_stops_the_items_not_yet_started(connect):
    started: list[str] = []
    cancelled: list[str] = []

    async def slow(call: Call) -> str:
        started.append(call.prompt)
        try:
            await anyio.sleep(0.3)
        except anyio.get_cancelled_exc_class():
            cancelled.append(call.prompt)
            raise
        return call.prompt

    server, client = await connect("slow"), await connect("client")
    calls = [client.make_call("slow", str(i)) for i in range(30)]
    async with (
        wire(client.nc.connected_url.geturl(), client.session, "slow") as w,
        serving(server, "slow", slow, concurrency=2),
    ):
        with anyio.move_on_after(0.15):
            await gather_sends(client, calls)
        await anyio.sleep(2.0)  # uncancelled, 2 at a time for 0.3 s each: ~14 would start
    assert len(w.messages) == 1 and len(w.batches[0].calls) == 30
    assert len(started) == 2, started
    assert sorted(cancelled) == sorted(started)


async def test_a_map_stopped_by_its_first_failure_never_runs_the_rest(connect):
    started: list[str] = []

    async def slow(call: Call) -> str:
        started.append(call.prompt)
        if call.prompt == "boom":
            raise ValueError("boom")
        await anyio.sleep(0.3)
        return call.prompt

    bus, peer = await connect("chair"), await connect("slow")
    async with (
        wire(peer.nc.connected_url.geturl(), peer.session, "slow") as w,
        serving(peer, "slow", slow, concurrency=2),
        Repl(bus, agent="chair", peers=[PeerSpec("slow")]) as repl,
    ):
        result = await repl.execute(
            "slow.map(['boom'] + [f'x{i}' for i in range(30)], raise_errors=True)"
        )
        assert result.status == "error" and "boom" in result.error
        await anyio.sleep(2.0)  # uncancelled, 2 at a time for 0.3 s each: ~14 would start
    # 'boom' and the one started beside it; at most one or two more took the freed slot
    # before their cancel arrived.
    assert 2 <= len(started) <= 5, started
    assert len(w.calls) == 31 and len(w.messages) <= 3  # the map left in one batch (or two)


async def test_an_item_that_claims_another_caller_or_callee_is_refused_alone(connect):
    server, client = await connect("echo"), await connect("client")
    inbox = client.nc.new_inbox()
    answers: dict[str, Any] = {}
    got_all = anyio.Event()

    async def on_answer(msg: Any) -> None:
        answer = decode(msg.data)
        if isinstance(answer, Working):
            return
        answers[msg.subject.rpartition(".")[2]] = answer
        if len(answers) == 3:
            got_all.set()

    await client.nc.subscribe(inbox + ".*", cb=on_answer)

    async def echo(call: Call) -> str:
        return call.prompt

    def call(prompt: str, **over: Any) -> Call:
        return client.make_call("echo", prompt).model_copy(update=over)

    items = [
        Addressed(reply=f"{inbox}.ok", call=call("fine")),
        Addressed(reply=f"{inbox}.spoof", call=call("spoof", caller="admin")),
        Addressed(reply=f"{inbox}.other", call=call("other", callee="critic")),
        # answering this one would publish into another party's inbox: never answered
        Addressed(reply=f"_INBOX.{client.session}.admin.x.1", call=call("elsewhere")),
    ]
    async with serving(server, "echo", echo):
        await client.nc.publish(
            subjects.call(client.session, "echo", "client"),
            encode(Batch(calls=items)),
            reply=f"{inbox}.ok",
        )
        with anyio.fail_after(10):
            await got_all.wait()
        await anyio.sleep(0.2)
        assert answers.keys() == {"ok", "spoof", "other"}
        assert isinstance(answers["ok"], Reply) and answers["ok"].value == "fine"
        assert isinstance(answers["spoof"], Failure)
        assert answers["spoof"].kind == "permission_denied"
        assert isinstance(answers["other"], Failure) and answers["other"].kind == "bad_request"
        assert (await client.call("echo", "still here")).value == "still here"


async def test_a_malformed_batch_gets_a_typed_error_and_the_server_keeps_serving(connect):
    server, client = await connect("echo"), await connect("client")
    good = client.make_call("echo", "x").model_dump(mode="json", by_alias=True)
    subject = subjects.call(client.session, "echo", "client")
    reply = f"_INBOX.{client.session}.client.raw"
    malformed = [
        {"type": "batch", "v": 1, "calls": []},
        {"type": "batch", "v": 1, "calls": [{"reply": reply, "call": {"type": "call"}}]},
        {"type": "batch", "v": 1, "calls": [{"call": good}]},
        {"type": "batch", "v": 1, "calls": [{"reply": reply, "call": good}] * 65},
        {"type": "batch", "v": 1, "calls": "everything"},
        {"type": "batch", "v": 1, "calls": [{"reply": reply, "call": {**good, "type": "batch"}}]},
    ]

    async def echo(call: Call) -> str:
        return call.prompt

    async with serving(server, "echo", echo):
        for body in malformed:
            msg = await client.nc.request(subject, json.dumps(body).encode(), timeout=5)
            failure = decode(msg.data)
            assert isinstance(failure, Failure) and failure.kind == "bad_request", body
            assert "'batch'" in failure.message
        # with no reply subject it can trust, the server only logs and drops it
        await client.nc.publish(subject, json.dumps(malformed[1]).encode())
        assert (await client.call("echo", "still here")).value == "still here"


# -- listeners see the calls, not the batch ----------------------------------------------------


def test_the_event_translator_sees_each_call_of_a_batch():
    calls = [
        Call(session="s", caller="chair", callee="llm", prompt=f"p{i}", parent="root")
        for i in range(3)
    ]
    batch = Batch(
        calls=[Addressed(reply=f"_INBOX.s.chair.i.{i}", call=c) for i, c in enumerate(calls)]
    )
    events = Translator("s").translate(encode(batch))
    assert [type(e) for e in events] == [CallStarted] * 3
    assert [e.call for e in events] == [c.id for c in calls]  # type: ignore[attr-defined]


async def test_the_progress_view_shows_each_call_of_a_batch(connect):
    async def echo(call: Call) -> str:
        return call.prompt

    server, client, runner = await connect("echo"), await connect("client"), await connect("runner")
    out = io.StringIO()
    calls = [client.make_call("echo", f"item {i}") for i in range(5)]
    async with serving(server, "echo", echo), anyio.create_task_group() as tg:
        await tg.start(partial(watch, runner, out, live=False))
        async with wire(client.nc.connected_url.geturl(), client.session, "echo") as w:
            await gather_sends(client, calls)
        with anyio.fail_after(10):
            while out.getvalue().count(" ok call=") < 5:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert len(w.messages) == 1
    lines = out.getvalue().splitlines()
    for c in calls:
        assert any(f"-> echo call={c.id[:8]}" in x and c.prompt in x for x in lines), c.prompt


def noter(messages: list[dict[str, Any]]) -> str:
    return "noted " + messages[-1]["content"]


def chair(messages: list[dict[str, Any]]) -> str:
    if sum(m["role"] == "assistant" for m in messages) == 0:
        return "```python\nnotes = llm.map([f'item {i}' for i in range(150)])\nFINAL(notes)\n```"
    return "```python\nFINAL(notes)\n```"


def boom(messages: list[dict[str, Any]]) -> str:
    raise AssertionError("a live model was called during a replay")


MAPPER = Council(
    entry="chair",
    peers=[Agent("chair", model="thinker", calls=["llm"]), LLM("llm", model="noter")],
)


async def test_a_session_that_maps_records_one_entry_per_call_and_replays_strictly(tmp_path):
    path, again = tmp_path / "map.jsonl", tmp_path / "replayed.jsonl"
    models = {"thinker": FunctionModel(chair), "noter": FunctionModel(noter)}
    async with Session(MAPPER, models=models, record=path, timeout=120) as s:
        async with wire_of(s, "llm") as w:
            live = await s.ask("go", timeout=120)
    assert live.value == [f"noted item {i}" for i in range(150)]
    assert w.batches and len(w.messages) < 50  # it did travel batched

    cassette = Cassette.load(path)
    assert not cassette.unusable()
    entries = [e for e in cassette.entries if e.kind == "call"]
    assert all(e.msg and e.msg["type"] == "call" for e in entries)
    llm_calls = [it for it in cassette.interactions() if it.call.callee == "llm"]
    assert sorted(it.call.prompt for it in llm_calls) == sorted(f"item {i}" for i in range(150))
    assert all(it.answer is not None for it in llm_calls)

    dead = {"thinker": FunctionModel(boom), "noter": FunctionModel(boom)}
    async with Session(MAPPER, models=dead, replay=path, record=again, strict=True) as s:
        replayed = await s.ask("go", timeout=120)
        assert (
            s.replayer is not None and s.replayer.served == 150 + 1
        )  # the map and the chair's one turn
    assert replayed.value == live.value
    assert tree(again) == tree(path)  # `council trace` draws the same tree


@asynccontextmanager
async def wire_of(session: Session, callee: str) -> AsyncIterator[Wire]:
    """The call messages to `callee` in a running session, on the runner's rights."""
    bus = await session.connect("watcher")
    seen = Wire()

    async def on_msg(msg: Any) -> None:
        seen.messages.append(msg.data)

    sub = await bus.nc.subscribe(subjects.call(session.session, callee, subjects.ANY), cb=on_msg)
    await bus.nc.flush()
    try:
        yield seen
    finally:
        await bus.nc.flush()
        await sub.drain()
