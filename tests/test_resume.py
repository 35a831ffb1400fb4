"""Resume: a run killed mid-fan-out carries on from its cassette, asking no model twice
(beyond the calls in flight when it died). Real processes all the way: `council run`, a
SIGKILL, `council resume`, a scripted OpenAI-compatible HTTP server that counts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from council.cassette import Cassette, CassetteTruncated
from tests.scripted_http import ServerProcess, server_process

HERE = Path(__file__).parent
ROOT = HERE.parent
N = 1000
CONCURRENCY = 16  # model requests in flight at most (the LLM peer's bound)

COUNCIL = f"""
from council import LLM, Agent, Council, Limits

council = Council(
    entry="root",
    peers=[
        Agent("root", model="openai/root", calls=["llm"], limits=Limits(iterations=3)),
        LLM("llm", model="openai/sub", concurrency={CONCURRENCY}, description="gives a number"),
    ],
)
"""


@pytest.fixture
def stubs() -> Iterator[Callable[[float], ServerProcess]]:
    """tests/counting_stub.py processes, answering each sub-call after the delay given."""
    with ExitStack() as stack:

        def make(delay: float) -> ServerProcess:
            argv = (sys.executable, str(HERE / "counting_stub.py"), str(N), str(delay))
            return stack.enter_context(server_process(*argv))

        yield make


def _env(stub: ServerProcess, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OPENAI_API_BASE=stub.url + "/v1",
        OPENAI_BASE_URL=stub.url + "/v1",
        OPENAI_API_KEY="sk-resumetest0123456789abcdef0123",
        COUNCIL_SESSIONS=str(tmp_path / "sessions"),
        COUNCIL_LOG_LEVEL="warning",
        PYTHONPATH=str(ROOT),
    )
    return env


def _council(tmp_path: Path) -> tuple[Path, Path]:
    spec = tmp_path / "fanout.py"
    spec.write_text(COUNCIL)
    rng = random.Random(7)
    context = tmp_path / "input.txt"
    context.write_text("".join(rng.choice("abcdefghij ") for _ in range(N * 12)))
    return spec, context


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "council.cli", *args]


def _run_args(spec: Path, context: Path, cassette: Path) -> list[str]:
    return _cli(
        "run",
        f"{spec}:council",
        "--prompt",
        "Add up the numbers of every part.",
        "--context",
        str(context),
        "--no-human",
        "--quiet",
        "--timeout",
        "300",
        "--record",
        str(cassette),
    )


def test_a_killed_run_resumes_with_the_same_answer_asking_only_the_calls_in_flight_again(
    tmp_path, stubs
):
    spec, context = _council(tmp_path)
    whole, cut = stubs(0.05), stubs(0.05)

    # The run as it should go: uninterrupted.
    done = subprocess.run(
        _run_args(spec, context, tmp_path / "whole.jsonl"),
        env=_env(whole, tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = done.stdout.strip()
    assert expected.startswith("total ") and expected.endswith(f"over {N}"), expected
    assert whole.get("/stats")["sub"] == N

    # The same run, its runner SIGKILLed after about 600 answers.
    cassette = tmp_path / "cut.jsonl"
    runner = subprocess.Popen(
        _run_args(spec, context, cassette),
        env=_env(cut, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while cut.get("/stats")["sub"] < 600:
        assert runner.poll() is None, runner.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never got to 600 model calls"
        time.sleep(0.01)
    runner.send_signal(signal.SIGKILL)
    runner.communicate()
    killed = cut.get("/stats")
    assert 600 <= killed["sub"] < N, killed

    with pytest.raises(CassetteTruncated):
        Cassette.load(cassette)  # cut short: a plain replay refuses it...
    partial = Cassette.load(cassette, lenient=True)  # ...a resume reads what is there
    answered = sum(1 for it in partial.interactions() if it.call.callee == "llm" and it.answer)
    assert answered >= killed["sub"] - CONCURRENCY * 2, (answered, killed)

    resumed = subprocess.run(
        _cli("resume", str(cassette), "--quiet", "--timeout", "300"),
        env=_env(cut, tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip() == expected
    after = cut.get("/stats")
    asked_twice = after["repeated"]
    print(
        f"\nresume: killed after {killed['sub']} model calls, {answered} answers recorded; "
        f"{after['sub'] - killed['sub']} asked by the resume; {asked_twice} asked twice "
        f"(in flight at most {CONCURRENCY}; max seen {killed['in_flight_max']})"
    )
    assert after["distinct"] == N  # every part asked, none forgotten
    # At most the calls in flight when the runner died: CONCURRENCY at the model server, and
    # answers the runner had received but not yet written (the recorder is at most a few ms
    # behind; measured: 16 asked twice, all of them the ones in flight at the model).
    assert asked_twice <= 2 * CONCURRENCY, after
    assert after["root"] == 1  # the root model's turn came from the recording
    # the key the models used never reached the cassette
    assert "sk-resumetest" not in cassette.read_text()

    # The cassette is whole again: both runs, the resumed one marked, and a plain replay
    # of it plays the run that finished.
    full = Cassette.load(cassette)
    assert [e.kind for e in full.entries].count("mark") == 1
    replayed = subprocess.run(
        [
            *_cli("run", f"{spec}:council", "--prompt", "Add up the numbers of every part."),
            *("--context", str(context), "--no-human", "--quiet", "--replay", str(cassette)),
        ],
        env=_env(cut, tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert replayed.stdout.strip() == expected
    assert cut.get("/stats")["sub"] == after["sub"]  # no model asked by the replay
    trace = subprocess.run(
        _cli("trace", str(cassette)), capture_output=True, text=True, env=_env(cut, tmp_path)
    )
    assert trace.returncode == 0 and "(resumed: at " in trace.stdout, trace.stderr


@pytest.mark.anyio
async def test_a_cut_cassette_is_carried_on_and_whole_again(
    nats_server, session_id, tmp_path, connect
):
    """Recorder(resume=): the cut-off line and the missing end go, a mark starts the new run,
    the result loads strictly; a replay plays the last run, a resume every answered call."""
    import anyio

    from channels.messages import Call
    from council.record import Recorder
    from council.replay import Replayer

    path = tmp_path / "r.jsonl"
    server, client, rb = await connect("echo"), await connect("client"), await connect("rec")

    async def echo(call: Call) -> str:
        return call.prompt.upper()

    async with Recorder(rb.nc, session_id, path, replay=["echo"]):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "echo", echo)
            for word in ("one", "two", "three"):
                await client.call("echo", word)
            tg.cancel_scope.cancel()
    lines = path.read_bytes().split(b"\n")[:-2]  # no end record...
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][:20])  # ...and a cut last line
    cut = Cassette.load(path, lenient=True)
    assert "cut off" in cut.problem and [str(d) for d in cut.damaged]
    answered = [it.call.prompt for it in cut.interactions() if it.answer is not None]
    assert answered == ["one", "two"]  # "three"'s reply was on the line cut off

    async with Recorder(rb.nc, session_id, path, resume=cut):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "echo", echo)
            for word in ("one", "two", "three", "four"):
                await client.call("echo", word)
            tg.cancel_scope.cancel()
    whole = Cassette.load(path)  # strict: count and digest hold over both runs
    assert whole.complete and len(whole.segments) == 2
    mark = whole.entries[whole.segments[1]]
    assert mark.kind == "mark" and mark.msg == {"session": session_id, "after": len(cut.entries)}
    replay = Replayer(whole, ["echo"])  # the run that finished
    assert [r.interaction.call.prompt for r in replay._recorded] == ["one", "two", "three", "four"]
    resume = Replayer(Cassette.load(path, lenient=True), ["echo"], resume=True)
    assert sorted(r.interaction.call.prompt for r in resume._recorded) == [
        "four",
        "one",
        "three",
        "two",
    ]


@pytest.mark.anyio
async def test_session_resume_hands_out_what_was_recorded_and_asks_only_the_rest(tmp_path):
    """Session(resume=): agents with real REPL code, a fan-out, a human; the recording cut
    as a SIGKILL leaves it (no end, a half line); the run finishes with the same answer and
    the models are asked only what the recording did not hold."""
    from agents.human import ScriptedHuman
    from agents.models import FunctionModel
    from council.session import Session
    from tests.test_session_replay import COUNCIL, DOCUMENT, FAN, live_models, noter, thinker

    path = tmp_path / "review.jsonl"
    async with Session(
        COUNCIL,
        models=live_models(),
        humans={"ada": ScriptedHuman("ada", ["publish it"])},
        record=path,
        timeout=120,
    ) as s:
        live = await s.ask("Review this draft", context=DOCUMENT, timeout=120)
    lines = path.read_bytes().split(b"\n")
    keep = int(len(lines) * 0.6)
    path.write_bytes(b"\n".join(lines[:keep]) + b"\n" + lines[keep][: len(lines[keep]) // 2])

    asked: list[str] = []

    def counted(fn):
        def model(messages):
            asked.append(fn.__name__)
            return fn(messages)

        return model

    cost = 2**-12
    models = {
        "thinker": FunctionModel(counted(thinker), cost=cost),
        "noter": FunctionModel(counted(noter), cost=cost),
    }
    ada = ScriptedHuman("ada", ["publish it"])
    async with Session(COUNCIL, models=models, humans={"ada": ada}, resume=path) as s:
        assert s.resumed is not None and s.resumed.prompt == "Review this draft"
        assert s.record_path == path
        resumed = await s.ask(s.resumed.prompt, context=s.resumed.context, timeout=120)
        replayer = s.replayer
    assert resumed.value == live.value
    assert replayer is not None and replayer.served > FAN // 3  # most came from the recording
    # every call was either handed out from the recording or asked live, none both
    assert replayer.served + len(replayer.forwarded) == FAN + 4 + 1
    assert len(asked) == len([c for c in replayer.forwarded if c.callee != "ada"])
    assert len(ada.asked) == sum(c.callee == "ada" for c in replayer.forwarded)
    whole = Cassette.load(path)
    assert len(whole.segments) == 2


def test_resume_asks_for_an_input_the_dead_run_never_saved_and_touches_nothing(tmp_path, capsys):
    """A big input lives in the session's store; a run killed before the end never saved it
    beside the cassette: `council resume` says to give it again, and leaves the file as is."""
    import shutil

    import anyio

    from agents.models import FunctionModel
    from council import LLM, Council, Session
    from council.cli import main
    from council.session import INLINE_CONTEXT_LIMIT

    council = Council(entry="llm", peers=[LLM("llm", model="m")])
    path = tmp_path / "big.jsonl"
    big = "a long document. " * (INLINE_CONTEXT_LIMIT // 16)

    async def record() -> None:
        async with Session(council, models={"m": FunctionModel(lambda m: "ok")}, record=path) as s:
            await s.ask("Summarise", context=big)

    anyio.run(record)
    cut = path.read_bytes().split(b"\n")[:-2]  # the end record never written...
    path.write_bytes(b"\n".join(cut) + b"\n")
    shutil.rmtree(Cassette.load(path, lenient=True).blobs_dir)  # ...nor the values saved
    before = path.read_bytes()
    assert main(["resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert "was in the dead session's store" in err and "--context PATH" in err
    assert path.read_bytes() == before
