"""A human on the bus: questions wait durably, late endpoints see them, each is answered once."""

from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path

import anyio
import pytest

from agents.human import (
    AlreadyAnswered,
    Answer,
    Final,
    HumanDesk,
    HumanPeer,
    ScriptedHuman,
    TerminalHuman,
    bucket_name,
    provision,
    send_final,
)
from channels.errors import CallTimeout

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


async def _ask(bus, human: str, prompt: str, context=None, out: dict | None = None, **kw):
    reply = await bus.call(human, prompt, context=context, **kw)
    if out is not None:
        out["answer"] = reply.value
    return reply.value


async def test_a_late_endpoint_sees_the_pending_question_and_answers_it_once(connect):
    peer_bus, chair, desk_bus, other_bus = (
        await connect("ada"),
        await connect("chair"),
        await connect("ada-desk"),
        await connect("ada-desk2"),
    )
    await provision(chair, ["ada"])  # the runner's part: peers never create buckets
    got: dict = {}
    async with anyio.create_task_group() as tg:
        await tg.start(HumanPeer("ada").run, peer_bus)
        tg.start_soon(_ask, chair, "ada", "Is the budget right?", "line 1: 40k\nline 2: 12k", got)
        # Nobody is at an endpoint yet; the question waits. Then one connects.
        desk = HumanDesk(desk_bus, "ada")
        with anyio.fail_after(10):
            while not (pending := await desk.pending()):
                await anyio.sleep(0.05)
        [q] = pending
        assert (q.asker, q.prompt) == ("chair", "Is the budget right?")
        assert q.context_preview.startswith("line 1: 40k")
        # A second endpoint sees the same question; the first answer wins, exactly once.
        other = HumanDesk(other_bus, "ada")
        assert [x.id for x in await other.pending()] == [q.id]
        await desk.answer(q, "yes")
        with pytest.raises(AlreadyAnswered):
            await other.answer(q, "no")
        with anyio.fail_after(10):
            while "answer" not in got:
                await anyio.sleep(0.02)
        assert got["answer"] == "yes"
        assert await desk.pending() == [] and await other.pending() == []
        tg.cancel_scope.cancel()


async def test_two_scripted_endpoints_racing_answer_each_question_once(connect):
    peer_bus, chair = await connect("ada"), await connect("chair")
    await provision(chair, ["ada"])
    first, second = (
        ScriptedHuman("ada", lambda q: "first"),
        ScriptedHuman("ada", lambda q: "second"),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(HumanPeer("ada").run, peer_bus)
        await tg.start(first.run, await connect("ada-desk"))
        await tg.start(second.run, await connect("ada-desk2"))
        with anyio.fail_after(20):
            answers = [await _ask(chair, "ada", f"q{i}", timeout=10) for i in range(5)]
        assert set(answers) <= {"first", "second"} and len(answers) == 5
        tg.cancel_scope.cancel()


async def test_a_question_whose_caller_gave_up_is_withdrawn(connect):
    peer_bus, chair, desk_bus = await connect("ada"), await connect("chair"), await connect("d")
    await provision(chair, ["ada"])
    async with anyio.create_task_group() as tg:
        await tg.start(HumanPeer("ada").run, peer_bus)
        with pytest.raises(CallTimeout):
            await chair.call("ada", "anyone there?", timeout=0.5)
        desk = HumanDesk(desk_bus, "ada")
        with anyio.fail_after(5):
            while await desk.pending():
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()


async def test_questions_survive_a_server_restart(own_server, session_id):
    from channels.bus import Bus

    peer_bus = await Bus.connect(own_server.url, session=session_id, name="ada")
    chair = await Bus.connect(own_server.url, session=session_id, name="chair")
    await provision(chair, ["ada"])
    got: dict = {}
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(HumanPeer("ada").run, peer_bus)
            tg.start_soon(_ask, chair, "ada", "still there?", None, got)
            async with await Bus.connect(own_server.url, session=session_id, name="d1") as d1:
                with anyio.fail_after(10):
                    while not await HumanDesk(d1, "ada").pending():
                        await anyio.sleep(0.05)
            own_server.restart()  # the endpoint reconnects later; JetStream kept the question
            async with await Bus.connect(own_server.url, session=session_id, name="d2") as d2:
                desk = HumanDesk(d2, "ada")
                with anyio.fail_after(15):
                    while not (pending := await _pending_or_empty(desk)):
                        await anyio.sleep(0.1)
                assert [q.prompt for q in pending] == ["still there?"]
                await desk.answer(pending[0], "yes, after the restart")
            with anyio.fail_after(15):
                while "answer" not in got:
                    await anyio.sleep(0.05)
            assert got["answer"] == "yes, after the restart"
            tg.cancel_scope.cancel()
    finally:
        await peer_bus.close()
        await chair.close()


async def _pending_or_empty(desk: HumanDesk):
    try:
        return await desk.pending()
    except Exception:  # the server is still coming back
        return []


async def test_terminal_endpoint_shows_who_asks_and_reads_the_answer(connect):
    peer_bus, chair = await connect("ada"), await connect("chair")
    await provision(chair, ["ada"])
    stdin, stdout = io.StringIO("forty-two\n"), io.StringIO()
    got: dict = {}
    async with anyio.create_task_group() as tg:
        await tg.start(HumanPeer("ada").run, peer_bus)
        await tg.start(TerminalHuman("ada", stdin=stdin, stdout=stdout).run, await connect("t"))
        await _ask(chair, "ada", "What is the answer?", "a long context " * 50, got, timeout=10)
        assert got["answer"] == "forty-two"
        await send_final(chair, "ada", Final(id="c1", prompt="big question", value="it was 42"))
        with anyio.fail_after(5):
            while "final answer: it was 42" not in stdout.getvalue():
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    shown = stdout.getvalue()
    assert "question from chair: What is the answer?" in shown
    assert "context: a long context a long context" in shown
    assert shown.count("a long context") < 50  # a preview, not the whole context


async def test_scripted_human_fails_loudly_when_out_of_answers(connect):
    human = ScriptedHuman("ada", ["only one"])
    from agents.human import Question

    q = Question(id="1", human="ada", asker="x", prompt="a")
    assert await human.respond(q) == "only one"
    with pytest.raises(Exception, match="no answer left"):
        await human.respond(q)


async def test_council_human_joins_late_from_another_process(tmp_path, clean_env):
    """`council human` started after the question was asked shows it and sends the answer."""
    import sys

    from council.declare import Council, Human
    from council.session import Session

    council = Council(entry="ada", peers=[Human("ada")])
    async with Session(council) as s:
        # What `council run` hands the person: the endpoint's own credential file, 0600.
        s.rights.write(tmp_path / "rights", only=["ada-desk"])
        creds = tmp_path / "rights" / "ada-desk.cred.json"
        assert sorted(p.name for p in (tmp_path / "rights").iterdir()) == [
            "ada-desk.cred.json",
            "nats.conf",
            "rights.json",
        ]
        assert creds.stat().st_mode & 0o777 == 0o600
        for other in ("ada", "admin"):  # nobody else's password is in any of the files
            secret = s.rights.credentials(other)[1]
            assert not any(secret in p.read_text() for p in (tmp_path / "rights").iterdir())
        got: dict = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(_ask, s.client, "ada", "Ship it?", "release notes v2", got)
            with anyio.fail_after(10):  # asked (and waiting) before any endpoint exists
                while not await HumanDesk(s.client, "ada").pending():
                    await anyio.sleep(0.05)
            proc = await anyio.open_process(
                [
                    sys.executable,
                    "-m",
                    "council.cli",
                    "human",
                    "--name",
                    "ada",
                    "--nats",
                    s.url,
                    "--session",
                    s.session,
                    "--rights",
                    str(creds),
                ],
                env={**clean_env, "COUNCIL_LOG_LEVEL": "error"},
                cwd=ROOT,
            )
            try:
                await proc.stdin.send(b"ship it\n")
                with anyio.fail_after(30):
                    while "answer" not in got:
                        await anyio.sleep(0.05)
                shown = b""
                with anyio.move_on_after(2):
                    async for chunk in proc.stdout:
                        shown += chunk
                        if b"release notes" in shown:
                            break
            finally:
                proc.terminate()
                await proc.wait()
        assert got["answer"] == "ship it"
        assert b"question from admin: Ship it?" in shown
        assert b"context: release notes v2" in shown


@pytest.fixture
def human_logs(monkeypatch):
    """What agents.human logs during the test (structlog's own capture)."""
    import structlog

    import agents.human

    with structlog.testing.capture_logs() as logs:
        # a fresh logger: the module's own may be cached with the normal processors
        monkeypatch.setattr(agents.human, "_log", structlog.get_logger("council.human"))
        yield logs


async def _admin_put(bus, key: str, data: bytes) -> None:
    """Write into ada's bucket as something other than council would (the runner's rights)."""
    await bus.nc.jetstream().publish(f"$KV.{bucket_name(bus.session, 'ada')}.{key}", data)


async def test_a_malformed_answer_is_skipped_with_a_warning_and_the_question_waits(
    connect, human_logs
):
    peer_bus, chair = await connect("ada"), await connect("chair")
    await provision(chair, ["ada"])
    got: dict = {}
    async with anyio.create_task_group() as tg:
        await tg.start(HumanPeer("ada").run, peer_bus)
        tg.start_soon(partial(_ask, chair, "ada", "Ship it?", None, got, timeout=30))
        desk = HumanDesk(chair, "ada")
        with anyio.fail_after(10):
            while not (pending := await desk.pending()):
                await anyio.sleep(0.05)
        [q] = pending
        await _admin_put(chair, f"a.{q.id}", b"{not json")
        with anyio.fail_after(10):
            while not any(e["event"] == "human.entry_skipped" for e in human_logs):
                await anyio.sleep(0.05)
        assert "answer" not in got  # not taken for an answer, and the peer did not fail
        await _admin_put(chair, f"a.{q.id}", Answer(id=q.id, text="yes").model_dump_json().encode())
        with anyio.fail_after(10):
            while "answer" not in got:
                await anyio.sleep(0.02)
        assert got["answer"] == "yes"
        tg.cancel_scope.cancel()
    [warning] = [e for e in human_logs if e["event"] == "human.entry_skipped"]
    assert warning["key"] == f"a.{q.id}" and warning["log_level"] == "warning"


async def test_malformed_questions_and_finals_are_skipped_by_an_endpoint(connect):
    peer_bus, chair = await connect("ada"), await connect("chair")
    await provision(chair, ["ada"])
    await _admin_put(chair, "q.bogus", b'{"id": "bogus"}')  # a question without its fields
    await _admin_put(chair, "q.binary", b"\xff\xfe")
    await _admin_put(chair, "f.bogus", b"[]")
    stdin, stdout = io.StringIO("forty-two\n"), io.StringIO()
    got: dict = {}
    async with anyio.create_task_group() as tg:
        await tg.start(HumanPeer("ada").run, peer_bus)
        await tg.start(TerminalHuman("ada", stdin=stdin, stdout=stdout).run, await connect("t"))
        await _ask(chair, "ada", "What is the answer?", None, got, timeout=20)
        await send_final(chair, "ada", Final(id="c1", prompt="p", value="it was 42"))
        with anyio.fail_after(10):
            while "final answer: it was 42" not in stdout.getvalue():
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert got["answer"] == "forty-two"
    assert [q.prompt for q in await HumanDesk(chair, "ada").pending()] == []


async def test_council_run_hands_the_human_a_credential_file_not_a_password(tmp_path, clean_env):
    """`council run` says how the person joins without printing any password; the command
    it prints works, from another process, on the endpoint's own credential file."""
    import re
    import sys

    src = tmp_path / "ask.py"
    src.write_text(
        "from council.declare import Council, Human\n"
        "council = Council(entry='ada', peers=[Human('ada')])\n"
    )
    env = {**clean_env, "COUNCIL_LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "council.cli"]
    run = await anyio.open_process(
        [*cmd, "run", f"{src}:council", "--prompt", "Ship it?", "--no-human", "--no-record"],
        env=env,
        cwd=tmp_path,
    )
    err = b""
    try:
        with anyio.fail_after(60):
            async for chunk in run.stderr:
                err += chunk
                if b"answers with:" in err and err.endswith(b"\n"):
                    break
        line = next(x for x in err.decode().splitlines() if "answers with:" in x)
        join = line.split("answers with: ", 1)[1].split()
        assert join[:2] == ["council", "human"] and "--rights" in join
        cred = Path(join[join.index("--rights") + 1])
        password = _check_cred_file(cred)
        assert password not in err.decode() and "NATS_PASSWORD" not in err.decode()
        human = await anyio.open_process([*cmd, *join[1:]], env=env, cwd=tmp_path)
        try:
            await human.stdin.send(b"ship it\n")
            out = b""
            with anyio.move_on_after(30):
                async for chunk in run.stdout:
                    out += chunk
                    if b"ship it" in out:
                        break
            if not re.search(rb"^ship it$", out, re.M):  # show why the endpoint failed
                if human.returncode is None:
                    human.terminate()
                await human.wait()
                raise AssertionError((out, await human.stderr.receive(100_000)))
        finally:
            if human.returncode is None:
                human.terminate()
            await human.wait()
        with anyio.fail_after(30):
            await run.wait()
        assert run.returncode == 0
        assert not await anyio.Path(cred.parent).exists()  # the session's end removes it
    finally:
        if run.returncode is None:
            run.terminate()
            await run.wait()


def _check_cred_file(cred: Path) -> str:
    """The endpoint's file is private, alone with the public parts, and holds its password."""
    assert cred.stat().st_mode & 0o777 == 0o600
    assert cred.parent.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in cred.parent.iterdir()) == [
        "ada-desk.cred.json",
        "nats.conf",
        "rights.json",
    ]
    return json.loads(cred.read_text())["password"]


def test_a_skipped_entry_warning_goes_to_the_stderr_of_the_moment(monkeypatch):
    """An endpoint's warning about a bad entry must not itself be fatal: logging writes to
    the stderr there is now, not to one a CLI or test harness swapped in and closed since."""
    import sys

    import structlog

    from channels import log

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.configure("warning", json=True)
    first.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    structlog.get_logger("council.human").warning("human.entry_skipped", key="q.bogus")
    assert json.loads(now.getvalue())["key"] == "q.bogus"
