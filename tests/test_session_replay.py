"""Sessions record and replay: a whole council (RLM agents running real REPL code, a
fan-out of a few hundred model calls, a human) recorded once, replayed with no model able to
answer; the CLI records by default; the pytest plugin gives a council test in a few lines;
an agent's concurrent REPL workers stay within the rights the server enforces."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.human import ScriptedHuman
from agents.models import FunctionModel
from channels import permissions
from channels.errors import CouncilError
from council.cassette import Cassette
from council.cli import main
from council.declare import LLM, Agent, Council, Human
from council.replay import ReplayMismatch, UnusedRecordings
from council.session import Session, children
from council.trace import build

pytestmark = pytest.mark.anyio
pytest_plugins = ["pytester"]

FAN = 240  # model calls made by the chair's code in one fan-out

CHAIR_TURN_1 = """```python
lines = context.split("\\n")
notes = llm.map([f"note on line {i}: {line}" for i, line in enumerate(lines)], raise_errors=True)
a, b = parallel(
    (critic_a, "review these notes", {"context": "\\n".join(notes[:20])}),
    (critic_b, "check these notes", {"context": "\\n".join(notes[20:50])}),
    raise_errors=True,
)
verdict = ada(f"{a} / {b}: publish?", context=notes[0])
print(len(notes), a, b, verdict)
```"""

CHAIR_TURN_2 = """```python
FINAL({"notes": len(notes), "critics": [a, b], "verdict": verdict, "last": notes[-1]})
```"""

CRITIC = """```python
FINAL(f"{ROLE}: {len(context.splitlines())} notes read, fine")
```"""


def thinker(messages: list[dict[str, Any]]) -> str:
    """The agents' scripted model: who is asking is in the system prompt, the turn is how
    many answers it has given so far."""
    system = messages[0]["content"]
    turn = sum(m["role"] == "assistant" for m in messages)
    if "role=chair" in system:
        return CHAIR_TURN_1 if turn == 0 else CHAIR_TURN_2
    role = "critic_a" if "role=critic_a" in system else "critic_b"
    return CRITIC.replace("{ROLE}", role)


def noter(messages: list[dict[str, Any]]) -> str:
    text = messages[-1]["content"]
    return "noted " + text.split(":", 1)[0].removeprefix("note on ")


def boom(messages: list[dict[str, Any]]) -> str:
    raise AssertionError("a live model was called during a replay")


def live_models() -> dict[str, FunctionModel]:
    cost = 2**-12  # exact in binary: sums agree in whatever order a fan-out finishes
    return {
        "thinker": FunctionModel(thinker, cost=cost),
        "noter": FunctionModel(noter, cost=cost),
    }


DEAD_MODELS = {"thinker": FunctionModel(boom), "noter": FunctionModel(boom)}

COUNCIL = Council(
    entry="chair",
    peers=[
        Agent(
            "chair",
            model="thinker",
            instructions="role=chair",
            calls=["llm", "critic_a", "critic_b", "ada"],
        ),
        Agent("critic_a", model="thinker", instructions="role=critic_a"),
        Agent("critic_b", model="thinker", instructions="role=critic_b"),
        LLM("llm", model="noter", concurrency=32),
        Human("ada"),
    ],
)

DOCUMENT = "\n".join(f"line {i:03d} of the draft, with a few words" for i in range(FAN))


def _stable(value: Any) -> Any:
    """A reply without what differs on every run (timings)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in ("duration", "wall_time")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def tree(path: Path) -> list[Any]:
    """The call tree of a cassette (trace.build), without ids and timings."""

    def shape(node: Any) -> tuple[Any, ...]:
        return (
            node.call.caller,
            node.call.callee,
            node.call.prompt,
            json.dumps(_stable(node.value), sort_keys=True, default=str),
            node.status,
            node.usage.model_calls,
            tuple(sorted((shape(c) for c in node.children), key=repr)),
        )

    return sorted((shape(r) for r in build(Cassette.load(path)).roots), key=repr)


def _usage(result: Any) -> dict[str, Any]:
    return result.usage.model_dump(exclude={"wall_time"})


@pytest.fixture(scope="module")
async def recorded(tmp_path_factory) -> tuple[Any, Path, ScriptedHuman]:
    path = tmp_path_factory.mktemp("sessions") / "review.jsonl"
    ada = ScriptedHuman("ada", ["publish it"])
    async with Session(
        COUNCIL, models=live_models(), humans={"ada": ada}, record=path, timeout=120
    ) as s:
        result = await s.ask("Review this draft", context=DOCUMENT, timeout=120)
    return result, path, ada


async def test_a_recorded_council_replays_with_no_live_model(recorded, tmp_path):
    live, path, ada = recorded
    assert live.value == {
        "notes": FAN,
        "critics": ["critic_a: 20 notes read, fine", "critic_b: 30 notes read, fine"],
        "verdict": "publish it",
        "last": f"noted line {FAN - 1}",
    }
    assert len(ada.asked) == 1
    # the header says what was recorded, and which peers a replay answers
    cassette = Cassette.load(path)
    assert cassette.header.council_digest == COUNCIL.digest
    assert cassette.header.models["chair-model"] == "thinker"
    assert set(cassette.header.replay) >= {"llm", "chair-model", "critic_a-model", "ada"}
    calls = [it.call for it in cassette.interactions()]
    assert sum(c.callee == "llm" for c in calls) == FAN

    before = children()
    again = tmp_path / "replayed.jsonl"
    nobody = ScriptedHuman("ada", [])  # a replayed human is never asked
    async with Session(
        COUNCIL,
        models=DEAD_MODELS,
        humans={"ada": nobody},
        replay=path,
        record=again,
        strict=True,
    ) as s:
        assert {"llm", "chair-model", "ada"} <= s.replayed
        assert "ada" not in s.humans
        replayed = await s.ask("Review this draft", context=DOCUMENT, timeout=120)
        assert s.replayer is not None
        assert s.replayer.served == FAN + 4 + 1  # chair 2 turns, critics 1 each, ada
    assert replayed.value == live.value
    assert _usage(replayed) == _usage(live)
    assert live.usage.model_calls == FAN + 4
    assert live.usage.cost == (FAN + 4) * 2**-12
    assert not nobody.asked
    assert tree(again) == tree(path)
    assert children() == before  # REPL workers and the server are gone


async def test_a_changed_request_fails_the_replay_naming_the_call(recorded):
    _, path, _ = recorded
    # One line of the input differs past what the chair's model is shown of it, so the
    # model's requests are the same: the replayed code runs for real and one prompt of its
    # fan-out differs.
    changed = DOCUMENT.replace("line 137 of the draft", "line 137 of the DRAFT")
    assert len(changed) == len(DOCUMENT) and changed[:200] == DOCUMENT[:200]
    with pytest.raises(ReplayMismatch) as err:
        async with Session(COUNCIL, models=DEAD_MODELS, replay=path, strict=True) as s:
            await s.ask("Review this draft", context=changed, timeout=120)
    message = str(err.value)
    assert "-> llm call" in message and "note on line 137" in message
    assert err.value.call.callee == "llm"
    assert '-prompt: "note on line 137: line 137 of the draft' in err.value.diff
    assert '+prompt: "note on line 137: line 137 of the DRAFT' in err.value.diff
    assert isinstance(err.value.__cause__, CouncilError)  # what the session saw first

    # Without strict the caller gets the peer's refusal and the session only reports.
    with pytest.raises(CouncilError, match="not in cassette"):
        async with Session(COUNCIL, models=DEAD_MODELS, replay=path) as s:
            await s.ask("Review this draft", context=changed, timeout=120)


async def test_strict_replay_fails_on_calls_never_made(recorded):
    _, path, _ = recorded
    with pytest.raises(UnusedRecordings, match="never requested"):
        async with Session(COUNCIL, models=DEAD_MODELS, replay=path, strict=True):
            pass  # nothing asked: every recording is unused


async def cli(argv: list[str]) -> int:
    """The command in a thread of its own: it runs its own event loop, as from a shell."""
    return await anyio.to_thread.run_sync(main, argv)


async def test_cli_records_by_default_and_replays(tmp_path, monkeypatch, capsys):
    module = tmp_path / "demo_council.py"
    module.write_text(
        "from council.declare import Council, Function, Human\n"
        "from agents.function import Peers\n\n"
        "async def chair(prompt: str, peers: Peers) -> str:\n"
        "    return 'ada says ' + await peers.ada(prompt)\n\n"
        "council = Council(entry='chair', peers=[Function(chair, calls=['ada']), Human('ada')])\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COUNCIL_SESSIONS", raising=False)  # the default: ./sessions
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    target = f"{module}:council"
    assert await cli(["run", target, "--prompt", "ship?", "--session", "cli1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["value"] == "ada says yes"
    cassette = tmp_path / "sessions" / "cli1.jsonl"
    assert f"recorded to {Path('sessions') / 'cli1.jsonl'}" in err
    assert Cassette.load(cassette).header.replay == ["ada"]

    # replayed: nobody types an answer, the recording gives it
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert (
        await cli(["run", target, "--prompt", "ship?", "--replay", str(cassette), "--strict"]) == 0
    )
    out, err = capsys.readouterr()
    assert out.strip() == "ada says yes"
    assert "replayed 1 of 1 recorded calls" in err
    assert (
        await cli(["run", target, "--prompt", "sail?", "--replay", str(cassette), "--strict"]) == 2
    )
    assert "not in cassette" in capsys.readouterr().err

    monkeypatch.setattr(sys, "stdin", io.StringIO("no\n"))
    assert await cli(["run", target, "--prompt", "x", "--no-record", "--session", "cli2"]) == 0
    assert not (tmp_path / "sessions" / "cli2.jsonl").exists()
    capsys.readouterr()
    assert await cli(["trace", str(cassette)]) == 0
    shown = capsys.readouterr().out
    assert "chair" in shown and "ada" in shown and "ship?" in shown
    for cmd, option in (("run", "--no-record"), ("run", "--replay CASSETTE"), ("trace", "--html")):
        with pytest.raises(SystemExit) as done:
            await cli([cmd, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "usage: council " + cmd in text and option in text


PLUGIN_TEST = """import pytest
from agents.models import ScriptedModel
from council.declare import LLM, Agent, Council
pytestmark = pytest.mark.anyio
council = Council(entry="chair", model={model!r}, peers=[Agent("chair", calls=["llm"]), LLM("llm")])

async def test_council(council_cassette):
    async with council_cassette.session(council, models={{{models}}}) as s:
        assert (await s.ask("Summarise the cat")).value == "A cat sat."
"""

SCRIPT = ["```python\nFINAL(llm('the cat sat on the mat'))\n```", "A cat sat."]


def test_the_plugin_runs_a_council_from_a_few_lines(pytester, nats_server, monkeypatch):
    monkeypatch.setenv("NATS_URL", nats_server.url)  # the plugin's fixture needs no server
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key, raising=False)

    def run(source: str, *options: str) -> pytest.RunResult:
        pytester.makepyfile(test_council_plugin_demo=source)
        return pytester.runpytest_subprocess("-q", "--tb=short", *options)

    live = PLUGIN_TEST.format(model="m", models=f'"m": ScriptedModel({SCRIPT!r})')
    paid = PLUGIN_TEST.format(model="openai/gpt-4o-mini", models="")  # no key, no script
    assert len(live.strip().splitlines()) < 10
    run(live).assert_outcomes(failed=1)  # mode none: nothing recorded yet
    run(live, "--council-record=once").assert_outcomes(passed=1)
    path = pytester.path / "cassettes" / "test_council_plugin_demo" / "test_council.jsonl"
    assert Cassette.load(path).header.replay == ["chair-model", "llm"]
    run(paid).assert_outcomes(passed=1)  # replayed: the paid model is never reached

    # the request changes: replay fails naming the call; new_episodes answers it live
    # (the chair's code then asks the llm what the cassette holds: replayed) and keeps both
    def dog(source: str) -> str:
        return source.replace("Summarise the cat", "Summarise the dog")

    changed = run(dog(paid))
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(
        ["*chair -> chair-model call*not in cassette*", "*+  Request: Summarise the dog*"]
    )
    run(dog(live), "--council-record=new_episodes").assert_outcomes(passed=1)
    calls = [it.call for it in Cassette.load(path).interactions()]
    requests = sorted(
        c.args["messages"][1]["content"].splitlines()[0] for c in calls if c.callee == "chair-model"
    )  # the new request answered live, and the old one kept for the old test
    assert requests == ["Request: Summarise the cat", "Request: Summarise the dog"]
    assert [c.prompt for c in calls if c.callee == "llm"] == ["the cat sat on the mat"]
    run(dog(paid)).assert_outcomes(passed=1)
    run(paid).assert_outcomes(passed=1)


# -- rights: an agent's concurrent REPL workers -------------------------------------------------

SLOW = """```python
import time
time.sleep(0.4)
if depth_probe := context:
    FINAL(rlm("child", context=None))
FINAL("done")
```"""


async def test_concurrent_calls_to_one_agent_each_get_a_repl_within_the_rights():
    """Two requests at once, each spawning a child agent: four REPL workers of one agent up
    together, each under a name the server lets the agent's REPL user serve."""

    def script(messages: list[dict[str, Any]]) -> str:
        return SLOW if "role=solver" in messages[0]["content"] else "?"

    council = Council(
        entry="solver",
        peers=[
            Agent("solver", model="s", instructions="role=solver", can_spawn=True, concurrency=2)
        ],
    )
    assert council.slots() == {"solver-repl": 4}
    r = permissions.rights("s1", council.edges(), serves=council.serves(), slots=council.slots())
    assert "council.s1.call.solver-repl-4.*" in r.for_peer("solver-repl-4").subscribe
    assert "council.s1.call.solver-repl-4.*" not in r.for_peer("solver-repl").subscribe
    with pytest.raises(KeyError):
        r.for_peer("solver-repl-5")
    assert "council.s1.call.solver-repl-4.solver" in r.for_peer("solver").publish
    before = children()
    async with Session(council, models={"s": FunctionModel(script)}) as s:
        assert s.rights is not None
        results: list[Any] = []

        async def ask() -> None:
            results.append(await s.ask("go", context="spawn", timeout=60))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            tg.start_soon(ask)
        # and a conversation turn (its REPL persists) under the same rights
        turn = await s.ask("again", args={"conversation": "c1"}, timeout=60)
    assert [r.value for r in results] == ["done", "done"]
    assert turn.value == "done"
    assert children() == before


async def test_a_repl_waits_for_a_free_name_and_says_when_none_came(connect):
    from agents.repl.host import Repl, WorkerFailed

    bus = await connect("a")
    first = Repl(bus, agent="a", slots=1)
    second = Repl(bus, agent="a", slots=1, startup_timeout=0.3)
    third = Repl(bus, agent="a", slots=1, startup_timeout=10)
    try:
        await first.start()
        assert first.name == "a-repl"
        with pytest.raises(WorkerFailed, match="raise the agent's concurrency"):
            await second.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(third.start)
            await anyio.sleep(0.3)
            assert not third.name  # still waiting: a-repl-2 is not a name it may use
            await first.close()
        assert third.name == "a-repl" and third.alive
    finally:
        for repl in (first, second, third):
            await repl.close()
