"""`session.events()`: a real session (an RLM agent on a scripted model, running real REPL
code that calls an LLM peer, a human and a failing function) seen as typed events."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.human import ScriptedHuman
from agents.models import FunctionModel, ScriptedModel
from channels import subjects
from channels.natsio import settle
from council.declare import LLM, Agent, Council, Function, Human
from council.events import (
    EVENT,
    AgentStep,
    CallEnded,
    CallStarted,
    Failed,
    HumanQuestion,
    ModelTokens,
    Other,
    ReplOutput,
)
from council.session import Session

pytestmark = pytest.mark.anyio


def broken(text: str) -> str:
    """Always fails."""
    raise RuntimeError("the checker fell over")


CODE = """```python
note = helper("summarise: " + context)
verdict = ada("publish " + note + "?")
try:
    checker("x")
except CallFailed as e:
    print("checker failed:", e.kind)
print("verdict", verdict)
FINAL({"note": note, "verdict": verdict})
```"""

COUNCIL = Council(
    entry="chair",
    peers=[
        Agent("chair", model="thinker", calls=["helper", "ada", "checker"]),
        LLM("helper", model="helper-model"),
        Human("ada"),
        Function(broken, name="checker"),
    ],
)


def models() -> dict[str, Any]:
    return {
        "thinker": ScriptedModel([CODE], name="thinker", usage=(120, 30), cost=0.002),
        "helper-model": FunctionModel(lambda messages: "short note"),
    }


async def test_a_session_is_seen_as_typed_events_in_order():
    human = ScriptedHuman("ada", ["yes"])
    seen: list[Any] = []
    answered = anyio.Event()
    async with Session(COUNCIL, models=models(), humans={"ada": human}) as s:
        async with s.events() as events:

            async def ask() -> None:
                result = await s.ask("the draft", context="a long draft", timeout=60)
                seen.append(result)
                answered.set()

            s.call_in(ask)
            got: list[Any] = []
            with anyio.fail_after(60):
                async for e in events:
                    got.append(e)
                    if isinstance(e, CallEnded) and e.call == e.root:
                        break
            with anyio.fail_after(10):
                await answered.wait()
    result = seen[0]
    assert result.value == {"note": "short note", "verdict": "yes"}
    root = result.call_id

    first = got[0]
    assert isinstance(first, CallStarted)
    assert (first.caller, first.callee, first.callee_kind, first.call) == (
        "admin",
        "chair",
        "agent",
        root,
    )
    assert all(e.session == s.session for e in got)
    assert all(e.root == root for e in got if not isinstance(e, Other)), [
        (type(e).__name__, e.root) for e in got if e.root != root
    ]

    calls = {
        (e.caller.split("-repl")[0], e.callee, e.callee_kind)
        for e in got
        if isinstance(e, CallStarted)
    }
    assert ("chair", "chair-model", "model") in calls
    assert ("chair", "chair-repl", "repl") in calls
    assert ("chair", "helper", "llm") in calls
    assert ("chair", "ada", "human") in calls

    tokens = [e for e in got if isinstance(e, ModelTokens)]
    thinker = next(e for e in tokens if e.peer == "chair-model")
    assert (thinker.model, thinker.input_tokens, thinker.output_tokens, thinker.cost) == (
        "thinker",
        120,
        30,
        0.002,
    )
    assert any(e.peer == "helper" and e.response == "short note" for e in tokens)

    question = next(e for e in got if isinstance(e, HumanQuestion))
    assert question.human == "ada" and question.question == "publish short note?"

    failure = next(e for e in got if isinstance(e, Failed))
    assert (failure.callee, failure.kind) == ("checker", "peer_error")
    assert "the checker fell over" in failure.message

    output = next(e for e in got if isinstance(e, ReplOutput))
    assert output.status == "ok" and "checker failed: peer_error" in output.output
    assert "verdict yes" in output.output and output.peer == "chair"

    assert any(isinstance(e, AgentStep) and e.peer == "chair" for e in got)
    last = got[-1]
    assert isinstance(last, CallEnded) and last.usage.model_calls == 2
    assert last.usage.cost == pytest.approx(0.002)
    # The order is causal: the question is asked before the function fails, both before the end.
    index = {id(e): i for i, e in enumerate(got)}
    assert index[id(question)] < index[id(failure)] < index[id(last)]

    for e in got:  # an app across a socket reads them back as the same types
        assert EVENT.validate_json(e.model_dump_json()) == e


async def test_an_unknown_event_type_arrives_as_other_and_the_stream_ends_with_the_session():
    async with Session(COUNCIL, models=models(), humans={"ada": ScriptedHuman("ada", [])}) as s:
        events = s.events()
        await events.start()
        raw = b'{"type":"fold","v":1,"session":"%s","peer":"chair","call":"c1","kept":3}' % (
            s.session.encode()
        )
        await s.client.nc.publish(subjects.event(s.session, "chair", "fold"), raw)
        with anyio.fail_after(10):
            e = await events.__anext__()
    assert isinstance(e, Other) and (e.kind, e.peer, e.call, e.data["kept"]) == (
        "fold",
        "chair",
        "c1",
        3,
    )
    with anyio.fail_after(5):  # the session is over: the stream ends instead of hanging
        rest = [x async for x in events]
    assert rest == []


async def test_closing_the_stream_keeps_what_the_server_already_sent_it():
    """A listener that closes just after an answer reached its neighbour still gets that
    answer (telemetry once exported a finished call as `unfinished` this way)."""
    n = 1000
    async with Session(COUNCIL, models=models(), humans={"ada": ScriptedHuman("ada", [])}) as s:
        events = await s.events(buffer=n + 10).start()
        for i in range(n):
            raw = b'{"type":"tick","v":1,"session":"%s","peer":"chair","n":%d}' % (
                s.session.encode(),
                i,
            )
            await s.client.nc.publish(subjects.event(s.session, "chair", "tick"), raw)
        await settle(s.client.nc)  # the server has routed all n to the listener
        await events.aclose()  # at once: most are still on the wire or in nats-py's queue
        got = [e async for e in events]
    assert [e.data["n"] for e in got] == list(range(n))


async def test_events_need_a_running_session():
    s = Session(COUNCIL, models=models())
    with pytest.raises(RuntimeError, match="not running"):
        async for _ in s.events():
            pass


README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


async def test_the_readme_events_example_runs(capsys):
    readme = README
    (block,) = [b for b in re.findall(r"```python\n(.+?)\n```", readme, re.S) if "def watch" in b]
    space: dict[str, Any] = {}
    exec(block, space)
    no_context = CODE.replace('"summarise: " + context', '"summarise"')
    scripted = models() | {"thinker": ScriptedModel([no_context], name="thinker", usage=(120, 30))}
    value = await space["watch"](
        COUNCIL, "the draft", models=scripted, humans={"ada": ScriptedHuman("ada", ["yes"])}
    )
    assert value == str({"note": "short note", "verdict": "yes"}).replace("'", '"')
    out = capsys.readouterr().out
    assert "admin -> chair: 'the draft'" in out
    assert "  thinker: 120+30 tokens" in out
    assert "  checker failed (peer_error): checker: RuntimeError: the checker fell over" in out
