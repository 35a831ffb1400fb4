"""The REPL sandbox, tried from inside REPL code the way hostile model code would try it.

Real worker subprocesses on a real nats-server. Each attack runs with the sandbox on (it must
be refused and the REPL must go on, same worker, variables kept) and, where it shows the test
can tell the difference, with the sandbox off (the same attack must succeed). NATS-level
attacks (other users, subjects, JetStream, spoofing) are in tests/test_redteam.py.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.limits import Limits
from agents.llm import LLMPeer
from agents.models import FunctionModel
from agents.prompt import PeerSpec
from agents.repl import host, sandbox
from agents.repl.env import worker_env
from agents.repl.host import Repl, WorkerFailed
from agents.repl.protocol import ExecResult
from agents.rlm import RLMAgent
from channels.bus import Bus
from channels.messages import Call
from tests.conftest import pid_alive, serving
from tests.test_repl import serving as serving_handler

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sandbox.support() is not None, reason=str(sandbox.support())),
]

REPO = Path(__file__).resolve().parent.parent


async def ok(repl: Repl, code: str) -> ExecResult:
    result = await repl.execute(code)
    assert result.status == "ok", result.for_model()
    return result


async def still_going(repl: Repl, pid: int | None) -> None:
    """The attack cost nothing: same worker, variables kept."""
    assert repl.pid == pid and repl.restarts == 0
    assert (await ok(repl, "kept")).value == "'before'"


READ = """
def attempt(path):
    try:
        with open(path, 'rb') as f:
            return 'READ ' + f.read(200).decode(errors='replace')
    except OSError as e:
        return f'REFUSED {{type(e).__name__}} {{e.errno}}'
[attempt(p) for p in {paths!r}]
"""


@pytest.fixture
def secrets(tmp_path: Path, nats_server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Files hostile code would go for, each holding a marker it must not see."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("SSH-PRIVATE-KEY-MARKER\n")
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DB_PASS", "ENV-MARKER-db")
    outside = tmp_path / "outside.txt"
    outside.write_text("OUTSIDE-MARKER\n")
    return {
        # The agent's process: its environment as it started (provider keys live there).
        f"/proc/{os.getpid()}/environ": Path(f"/proc/{os.getpid()}/environ")
        .read_bytes()
        .split(b"\0")[0][:40]
        .decode(errors="replace"),
        str(home / ".ssh" / "id_ed25519"): "SSH-PRIVATE-KEY-MARKER",
        str(REPO / "README.md"): "# ",
        str(nats_server._workdir / "nats.conf"): "listen",
        str(outside): "OUTSIDE-MARKER",
    }


async def test_files_outside_its_own_directory_are_refused(connect, secrets):
    async with Repl(await connect("chair"), agent="chair") as repl:
        assert repl.sandboxed
        pid = repl.pid
        await ok(repl, "kept = 'before'")
        shown = (await ok(repl, READ.format(paths=list(secrets)))).value
        for path, marker in secrets.items():
            assert marker not in shown, path
        assert shown.count("REFUSED") == len(secrets), shown
        # Writing outside is refused; its own directory is its to use.
        wrote = await ok(
            repl,
            "def write(path):\n"
            "    try:\n"
            "        open(path, 'w').write('x')\n"
            "        return 'WROTE'\n"
            "    except OSError as e:\n"
            "        return type(e).__name__\n"
            f"(write({str(REPO / 'pwned.txt')!r}), write('/tmp/pwned.txt'), write('mine.txt'),"
            " open('mine.txt').read())",
        )
        assert wrote.value == "('PermissionError', 'PermissionError', 'WROTE', 'x')"
        assert not (REPO / "pwned.txt").exists()
        await still_going(repl, pid)


async def test_with_the_sandbox_off_the_same_reads_succeed(connect, secrets):
    async with Repl(await connect("chair"), agent="chair", sandbox="off") as repl:
        assert not repl.sandboxed
        shown = (await ok(repl, READ.format(paths=list(secrets)))).value
        for path, marker in secrets.items():
            assert marker in shown, path
        assert (await repl.stats()).sandbox is None


async def test_only_the_nats_port_can_be_reached(connect):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def echo(call: Call) -> str:
        return f"echo {call.prompt}"

    code = f"""
import socket
def try_(what, fn):
    try:
        fn()
        return what + ' ALLOWED'
    except OSError as e:
        return f'{{what}} {{type(e).__name__}}'
[
    try_('connect', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=5).close()),
    try_('bind', lambda: socket.socket().bind(('127.0.0.1', 0))),
    try_('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))),
    try_('unix', lambda: socket.socket(socket.AF_UNIX)),
]
"""
    bus, peer = await connect("chair"), await connect("echo")
    try:
        async with serving_handler(peer, "echo", echo):
            async with Repl(bus, agent="chair", peers=[PeerSpec("echo")]) as repl:
                pid = repl.pid
                await ok(repl, "kept = 'before'")
                tried = (await ok(repl, code)).value
                assert tried == (
                    "['connect PermissionError', 'bind PermissionError', "
                    "'udp PermissionError', 'unix PermissionError']"
                )
                # NATS itself still works: a call from code reaches the peer and comes back.
                assert (await ok(repl, "echo('hi')")).value == "'echo hi'"
                await still_going(repl, pid)
            async with Repl(bus, agent="chair", sandbox="off") as off:
                tried = (await ok(off, code)).value
                assert tried.startswith("['connect ALLOWED', 'bind ALLOWED'")
    finally:
        listener.close()


PTRACE = """
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)

class iovec(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]

src = ctypes.create_string_buffer(b'secret', 6)
dst = ctypes.create_string_buffer(6)
local, remote = iovec(ctypes.addressof(dst), 6), iovec(ctypes.addressof(src), 6)
ctypes.set_errno(0)
read = libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
read_errno = ctypes.get_errno()
victim = os.fork()
if victim == 0:
    time.sleep(30)
    os._exit(0)
ctypes.set_errno(0)
traced = libc.ptrace(16, victim, 0, 0)  # PTRACE_ATTACH to a process of its own
trace_errno = ctypes.get_errno()
os.kill(victim, signal.SIGKILL)
os.waitpid(victim, 0)
ctypes.set_errno(0)
shared = libc.unshare(0x10000000)  # CLONE_NEWUSER
unshare_errno = ctypes.get_errno()
(read, read_errno, traced, trace_errno, shared, unshare_errno)
"""


async def test_ptrace_process_vm_readv_and_unshare_fail_with_eperm(connect):
    bus = await connect("chair")
    async with Repl(bus, agent="chair") as repl:
        pid = repl.pid
        await ok(repl, "kept = 'before'")
        assert (await ok(repl, PTRACE)).value == "(-1, 1, -1, 1, -1, 1)"
        await still_going(repl, pid)
    async with Repl(bus, agent="chair", sandbox="off") as off:
        read = (await ok(off, PTRACE)).value
        assert read.startswith("(6, 0, 0, 0,"), read  # both work unsandboxed


def _marked(marker: str) -> list[int]:
    """Host pids whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and pid_alive(int(entry)):
                found.append(int(entry))
    return found


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}])
    os._exit(0)
time.sleep(0.5)
'forked'
"""


async def _gone(marker: str) -> None:
    with anyio.fail_after(10):
        while _marked(marker):
            await anyio.sleep(0.05)


async def _daemon(repl: Repl, marker: str) -> None:
    assert (await ok(repl, DAEMON.format(marker=marker))).value == "'forked'"
    with anyio.fail_after(10):
        while not _marked(marker):  # the test can see it while the worker lives
            await anyio.sleep(0.05)


@pytest.mark.parametrize("mode", ["on", "off"])
async def test_a_double_forked_daemon_dies_with_the_worker(connect, mode):
    marker = f"council-daemon-{mode}-{os.getpid()}-{time.monotonic_ns()}"
    repl = Repl(await connect("chair"), agent="chair", sandbox=mode)
    await repl.start()
    try:
        if mode == "on":  # a worker killed (timeout, crash, cancel) takes its tree along
            await _daemon(repl, marker + "-killed")
            await repl.restart("test")
            await _gone(marker + "-killed")
        await _daemon(repl, marker)
    finally:
        await repl.close()  # a worker closed in order, too
    if mode == "on":
        await _gone(marker)
    else:  # unsandboxed it outlives the worker (reparented): clean up after proving it
        await anyio.sleep(0.5)
        left = _marked(marker)
        assert left
        for pid in left:
            os.kill(pid, 9)


async def test_output_over_the_cap_is_cut_on_stdout_and_on_fd_2(connect):
    async with Repl(
        await connect("chair"), agent="chair", output_cap=10_000, sandbox_policy={"file_mb": 4}
    ) as repl:
        pid = repl.pid
        await ok(repl, "kept = 'before'")
        printed = await ok(repl, "import sys\nfor _ in range(200):\n    print('x' * 100_000)")
        assert printed.stdout_cut > 19_000_000 and len(printed.stdout) < 11_000
        raw = await ok(
            repl,
            "import os\n"
            "written, error = 0, None\n"
            "chunk = b'y' * (1 << 20)\n"
            "for _ in range(32):\n"
            "    try:\n"
            "        written += os.write(2, chunk)\n"
            "    except OSError as e:\n"
            "        error = e.errno\n"
            "        break\n"
            "(written, error)",
        )
        written, error = eval(raw.value)
        assert error == 27 and written <= 4 << 20  # EFBIG at the cap, not 32 MB later
        # fd 1 below Python (C code, child processes) goes to /dev/null, nowhere on disk.
        dropped = await ok(repl, "os.write(1, b'z' * (8 << 20))")
        assert dropped.value == str(8 << 20) and dropped.stdout == ""
        log = Path(repl._logdir) / "worker.log"
        assert log.stat().st_size <= 4 << 20
        await still_going(repl, pid)


FORK_BOMB = """
import os, signal, time
children, error = [], None
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError as e:
        error = type(e).__name__
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
(len(children), error)
"""


async def test_a_fork_bomb_is_bounded(connect):
    async with Repl(
        await connect("chair"), agent="chair", sandbox_policy={"processes": 64}
    ) as repl:
        pid = repl.pid
        await ok(repl, "kept = 'before'")
        forked, error = eval((await ok(repl, FORK_BOMB)).value)
        assert error == "BlockingIOError" and 0 < forked < 64, (forked, error)
        await still_going(repl, pid)


async def test_the_interpreter_stdlib_and_installed_packages_still_work(connect):
    async with Repl(await connect("chair"), agent="chair") as repl:
        result = await ok(
            repl,
            "import json, os, sqlite3, decimal, zoneinfo, ssl, hashlib, subprocess, sys\n"
            "import numpy, pydantic, yaml\n"
            "db = sqlite3.connect('scratch.db')\n"
            "db.execute('create table t (x)')\n"
            "run = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True)\n"
            "(json.dumps({'a': 1}), int(numpy.arange(10).sum()), run.stdout.strip(),"
            " str(decimal.Decimal('1.5') * 2), os.getpid())",
        )
        assert result.value == "('{\"a\": 1}', 45, b'42', '3.0', 2)"
        stats = await repl.stats()
        assert stats.sandbox is not None and stats.sandbox["seccomp"] is True
        assert stats.sandbox["landlock_abi"] >= 4 and stats.sandbox["proc"] == "own"


async def test_the_environment_is_an_allow_list(connect, monkeypatch):
    leaks = {
        "DB_PASS": "hunter2",
        "SENTRY_DSN": "https://abc@sentry.example/1",
        "SLACK_WEBHOOK": "https://hooks.example/T000/B000/XXXX",
        "NATS_USER": "admin",
        "COUNCIL_RIGHTS": "/etc/council",
    }
    for k, v in leaks.items():
        monkeypatch.setenv(k, v)
    async with Repl(await connect("chair"), agent="chair") as repl:
        env = (await ok(repl, "import os\nsorted(os.environ)")).value
        raw = (await ok(repl, "open('/proc/self/environ', 'rb').read().decode()")).value
    for k, v in leaks.items():
        assert k not in env and v not in raw
    assert set(eval(env)) <= set(worker_env(workdir="/x")) | {"LC_CTYPE"}


async def test_unsupported_kernels_on_refuses_auto_says_so(connect, monkeypatch, capfd):
    """The one fake here: a kernel without Landlock cannot be had on this machine."""
    monkeypatch.setattr(sandbox, "support", lambda: "this kernel has no Landlock")
    bus = await connect("chair")
    with pytest.raises(WorkerFailed, match=r"no Landlock.*sandbox='auto'"):
        Repl(bus, agent="chair", sandbox="on")
    monkeypatch.setattr(host, "_told", set())
    capfd.readouterr()
    repl = Repl(bus, agent="chair", sandbox="auto")
    assert not repl.sandboxed and not Repl(bus, agent="chair", sandbox="auto").sandboxed
    said = capfd.readouterr().err
    assert said.count("repl.sandbox_unavailable") == 1 and "UNSANDBOXED" in said
    with pytest.raises(ValueError, match="'on', 'auto' or 'off'"):
        Repl(bus, agent="chair", sandbox="yes")
    # A session refuses before it starts anything.
    from council.declare import Agent, Council
    from council.session import build

    with pytest.raises(WorkerFailed, match="not available here"):
        build(Council(entry="a", model="m", peers=[Agent("a")]), "a")
    assert build(Council(entry="a", model="m", peers=[Agent("a", sandbox="auto")]), "a")


async def test_an_agents_endless_loop_stops_at_its_execution_limit_and_it_finishes(nats_server):
    turns: list[str] = []
    at: list[float] = []

    def model(messages: list[dict[str, Any]], **_: Any) -> str:
        turns.append(messages[-1]["content"])
        at.append(time.monotonic())
        if len(turns) == 1:
            return "```python\nwhile True:\n    pass\n```"
        return "```python\nFINAL('recovered')\n```"

    agent = RLMAgent("chair", limits=Limits(execution=5))
    async with serving(
        nats_server.url,
        "loop" + str(os.getpid()),
        agent,
        LLMPeer("chair-model", FunctionModel(model)),
    ) as client:
        await agent.warm()
        reply = await client.call("chair", "spin", timeout=300)
    assert reply.value == "recovered"
    assert len(turns) == 2 and at[1] - at[0] < 10, at
    told = turns[1]
    assert "execution time limit (5s)" in told and "variables were lost" in told.lower()


def test_the_declaration_and_the_cli_choose_the_sandbox():
    from council.cli import _parser
    from council.declare import LLM, Agent, Council
    from council.session import build

    council = Council(
        entry="a", model="m", peers=[Agent("a", calls=["l"], sandbox="auto"), LLM("l")]
    )
    agent = build(council, "a")[0]
    assert agent.repl_options["sandbox"] == "auto"
    assert agent.limits.execution == 120  # the default every REPL of the agent gets
    assert build(council.with_sandbox("off"), "a")[0].repl_options["sandbox"] == "off"
    assert (
        build(Council(entry="a", model="m", peers=[Agent("a")]), "a")[0].repl_options["sandbox"]
        == "on"
    )
    args = _parser().parse_args(["run", "x.py:council", "--sandbox", "off", "-p", "hi"])
    assert args.sandbox == "off"
    serve = ["serve", "x.py:council", "--peer", "a", "--nats", "nats://h:1", "--session", "s"]
    assert _parser().parse_args([*serve, "--sandbox", "auto"]).sandbox == "auto"
    with pytest.raises(SystemExit):
        _parser().parse_args([*serve, "--sandbox", "maybe"])


async def test_a_nats_url_with_a_host_name_works_sandboxed(nats_server, session_id):
    """The worker resolves names before its sandbox closes (afterwards there is no UDP, so
    no DNS; `localhost` would still resolve from /etc/hosts, a DNS name would not)."""
    from agents.repl.worker import resolved

    url = nats_server.url.replace("127.0.0.1", "localhost")
    assert resolved(url) == nats_server.url and resolved("nats://u:p@localhost:1,x") == (
        "nats://u:p@127.0.0.1:1,x"
    )
    peer = await Bus.connect(nats_server.url, session=session_id, name="echo")

    async def echo(call: Call) -> str:
        return f"echo {call.prompt}"

    try:
        async with (
            serving_handler(peer, "echo", echo),
            Repl(url, session=session_id, agent="chair", peers=[PeerSpec("echo")]) as repl,
        ):
            assert repl.sandboxed
            assert (await ok(repl, "echo('hi')")).value == "'echo hi'"
    finally:
        await peer.close()
