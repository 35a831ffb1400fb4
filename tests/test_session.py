"""Running councils: in process, across OS processes, from the CLI; and tearing down cleanly."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import anyio
import pytest

from agents.human import ScriptedHuman
from channels import permissions
from channels.bus import Bus
from channels.errors import PeerError, PermissionDenied
from channels.server import running_server
from council.cli import main
from council.declare import Agent, Council, load_target
from council.session import PeerUnavailable, Session, children, run
from tests.conftest import pid_alive, serving_elsewhere

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent

COUNCIL_FILE = '''
"""A chair that asks two critics and a human, all plain functions (no model needed)."""
import os

import anyio

from agents.function import Peers
from council.declare import Council, Function, Human


def critic_a(draft: str) -> str:
    """Counts the words."""
    return f"{len(draft.split())} words"


async def critic_b(draft: str) -> str:
    """Counts the sentences."""
    await anyio.sleep(0)
    return f"{draft.count('.')} sentences"


def slow(seconds: float) -> str:
    """Sleeps, so a test can interrupt a run."""
    import time
    time.sleep(seconds)
    return "done"


def broken(text: str) -> str:
    raise RuntimeError("the critic fell over")


async def chair(prompt: str, peers: Peers) -> dict:
    """Asks both critics at once, then the human."""
    async with anyio.create_task_group() as tg:
        found = {}

        async def ask(name):
            found[name] = await peers(name, prompt)

        tg.start_soon(ask, "critic_a")
        tg.start_soon(ask, "critic_b")
    verdict = await peers.ada(f"{found['critic_a']}, {found['critic_b']}: publish?", context=prompt)
    return {"critics": [found["critic_a"], found["critic_b"]], "verdict": verdict}


council = Council(
    entry="chair",
    peers=[
        Function(chair, calls=["critic_a", "critic_b", "ada"]),
        Function(critic_a),
        Function(critic_b),
        Function(slow),
        Function(broken),
        Human("ada"),
    ],
)
'''

DRAFT = "Councils are useful. They argue. Then they agree."
EXPECTED = {"critics": ["8 words", "3 sentences"], "verdict": "publish it"}


@pytest.fixture
def council_file(tmp_path: Path) -> Path:
    path = tmp_path / "review_council.py"
    path.write_text(COUNCIL_FILE)
    return path


@pytest.fixture
def council(council_file: Path) -> Council:
    return load_target(f"{council_file}:council")


def _env(clean_env: dict[str, str]) -> dict[str, str]:
    return {**clean_env, "COUNCIL_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}


async def test_a_chair_two_critics_and_a_scripted_human_reach_an_answer(council):
    before = children()
    ada = ScriptedHuman("ada", ["publish it"])
    async with Session(council, humans={"ada": ada}) as s:
        assert s.rights is not None  # each peer on its own NATS user
        result = await s.ask(DRAFT, notify="ada", timeout=30)
        server_pid = s.server_pid
        assert server_pid in children()
        with anyio.fail_after(5):
            while not ada.finals:
                await anyio.sleep(0.02)
    assert result.value == EXPECTED
    assert result.session == s.session and result.usage.wall_time > 0
    [q] = ada.asked
    assert (q.asker, q.prompt) == ("chair", "8 words, 3 sentences: publish?")
    assert q.context_preview == DRAFT
    assert ada.finals[0].value == EXPECTED  # the final answer went back to the human
    assert not pid_alive(server_pid)
    assert children() == before


async def test_teardown_after_a_failure_mid_run_leaves_no_process(council):
    before = children()
    with pytest.raises(PeerError, match="the critic fell over"):
        async with Session(council) as s:
            pid = s.server_pid
            await s.ask("x", entry="broken", timeout=10)
    assert not pid_alive(pid)
    assert children() == before

    # An exception of the caller's own, in the middle of a call that is still running.
    with pytest.raises(ZeroDivisionError):
        async with Session(council) as s:
            pid = s.server_pid
            s.call_in(partial(s.ask, "3", entry="slow"))
            await anyio.sleep(0.3)
            1 / 0  # noqa: B018
    assert not pid_alive(pid)
    assert children() == before


def test_sync_run_returns_the_answer(council_file):
    c = load_target(f"{council_file}:council")
    result = run(c, DRAFT, humans={"ada": ScriptedHuman("ada", ["publish it"])}, timeout=30)
    assert result.value == EXPECTED


async def test_an_agent_peer_needs_the_rlm_runtime_or_says_why(council, monkeypatch):
    c = Council(entry="a", peers=[Agent("a", model="m")])
    monkeypatch.setitem(sys.modules, "agents.rlm", None)  # as if it were not installed
    before = children()
    with pytest.raises(PeerUnavailable, match="cannot run agent 'a'"):
        async with Session(c):
            pass
    assert children() == before


async def test_three_processes_give_the_same_answer_as_one(
    council, council_file, session_id, clean_env, tmp_path, capsys
):
    async with Session(council, humans={"ada": ScriptedHuman("ada", ["publish it"])}) as s:
        in_process = (await s.ask(DRAFT, timeout=30)).value

    # An external server, configured as the README says: `council rights` prints the users
    # block for the server's config (hashes only) and writes one credential file per user;
    # each machine gets rights.json and the credential files of the peers it runs, no more.
    creds = tmp_path / "rights"
    assert (
        main(["rights", f"{council_file}:council", "--session", session_id, "--out", str(creds)])
        == 0
    )
    block = capsys.readouterr().out
    assert oct(creds.stat().st_mode & 0o777) == "0o700"
    assert {oct(f.stat().st_mode & 0o777) for f in creds.iterdir()} == {"0o600"}
    full = permissions.Rights.load(creds)
    assert all(full.credentials(n)[1] not in block for n in ("admin", "critic_a", "ada"))

    def machine(*names: str) -> Path:
        d = tmp_path / "-".join(names)
        d.mkdir(mode=0o700)
        for f in ["rights.json", *(permissions.cred_file_name(n) for n in names)]:
            shutil.copy(creds / f, d / f)
        return d

    rights = permissions.Rights.load(machine("admin", "chair", "ada", "ada-desk"))
    assert not rights.holds("critic_a")
    with running_server(config_extra=block) as server, ExitStack() as elsewhere:
        procs = [
            elsewhere.enter_context(
                serving_elsewhere(
                    f"{council_file}:council",
                    name,
                    server.url,
                    session_id,
                    "--rights",
                    str(machine(name)),
                    env=_env(clean_env),
                )
            )
            for name in ("critic_a", "critic_b")
        ]
        async with Session(
            council,
            nats_url=server.url,
            rights=rights,
            local=["chair", "ada"],
            humans={"ada": ScriptedHuman("ada", ["publish it"])},
        ) as s:
            assert s.session == session_id
            assert set(s.peers) == {"chair", "ada"}  # the critics answer from elsewhere
            across = (await s.ask(DRAFT, timeout=30)).value
            # The server holds the remote peers to their edges too.
            with pytest.raises(PermissionDenied):
                bus = await Bus.connect(
                    server.url,
                    session=session_id,
                    name="critic_a",
                    user=full.credentials("critic_a")[0],
                    password=full.credentials("critic_a")[1],
                )
                try:
                    await bus.call("critic_b", "x", timeout=30)
                finally:
                    await bus.close()
    codes = [p.returncode for p in procs]  # stopped with SIGTERM as the block ended
    assert across == in_process == EXPECTED
    assert codes == [0, 0]  # SIGTERM is an orderly stop


def _cli(*args: str, env: dict[str, str], input: str | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "council.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        input=input,
        timeout=timeout,
    )


def test_cli_show_run_and_errors_that_name_the_fix(
    council_file, tmp_path, clean_env, capsys, monkeypatch
):
    shown = _cli("show", f"{council_file}:council", env=_env(clean_env))  # the real command
    assert shown.returncode == 0, shown.stderr
    assert "chair  function (prompt: str) -> dict" in shown.stdout
    assert "├── critic_a  function (draft: str) -> str" in shown.stdout
    assert "not reachable from the entry:" in shown.stdout and "slow" in shown.stdout

    bad = tmp_path / "bad.py"
    bad.write_text(
        "from council.declare import Council, Agent, LLM\n"
        "council = Council(entry='boss', peers=[Agent('chair', calls=['critic']), LLM('llm')])\n"
    )
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    for needle in ("'chair' has no model", "calls 'critic'", "entry 'boss'", "'llm' has no model"):
        assert needle in err, err

    # `council run` records by default: into this test's folder, not the repo.
    monkeypatch.setenv("COUNCIL_SESSIONS", str(tmp_path / "sessions"))
    # The human answers on the terminal endpoint `council run` opens (stdin here).
    monkeypatch.setattr(sys, "stdin", io.StringIO("publish it\n"))
    assert main(["run", f"{council_file}:council", "--prompt", DRAFT, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["value"] == EXPECTED
    assert "question from chair" in err

    # Without --prompt the request comes from the terminal too, and the answer goes back.
    monkeypatch.setattr(sys, "stdin", io.StringIO(DRAFT + "\npublish it\n"))
    assert main(["run", f"{council_file}:council"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out[: out.rindex("}") + 1]) == EXPECTED
    assert len(list((tmp_path / "sessions").glob("*.jsonl"))) == 2
    assert "request for chair>" in err

    assert main(["run", f"{council_file}:council", "--prompt", "x", "--context", "nope"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", f"{council_file}:council", "--prompt", "x", "--human", "bob"]) == 2
    assert "not a human peer of this council; its humans: ada" in capsys.readouterr().err
    for cmd in ("show", "run", "serve", "human"):
        with pytest.raises(SystemExit) as done:
            main([cmd, "--help"])
        assert done.value.code == 0
        assert "usage: council " + cmd in capsys.readouterr().out


def test_ctrl_c_stops_everything(council_file, tmp_path, clean_env):
    runner = tmp_path / "runner.py"
    runner.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            from council.declare import load_target
            from council.session import Session, run
            import anyio

            async def main():
                c = load_target({str(council_file)!r} + ":council")
                async with Session(c) as s:
                    print("server", s.server_pid, flush=True)
                    await s.ask("30", entry="slow", timeout=60)

            try:
                anyio.run(main)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
            """
        )
    )
    p = subprocess.Popen(
        [sys.executable, str(runner)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(clean_env),
        cwd=ROOT,
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("server"), p.stderr.read()
        server_pid = int(line.split()[1])
        assert pid_alive(server_pid) and server_pid in children(p.pid)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in out
    deadline = time.monotonic() + 5
    while pid_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(server_pid)
    assert os.getpid()  # the test process itself is untouched


async def test_progress_prints_a_line_per_event(council):
    from channels.messages import Step
    from council.progress import watch

    out = io.StringIO()
    async with Session(council) as s:
        await s.start(partial(watch, s.client, out))
        await s.client.publish(Step(session=s.session, peer="chair", n=1, detail="thinking"))
        with anyio.fail_after(5):
            while "turn 1 start: thinking" not in out.getvalue():
                await anyio.sleep(0.02)
    assert "chair" in out.getvalue()
