"""Faults against a real nats-server and real serving processes: a callee SIGKILLed mid-call,
one of several processes serving a peer killed mid-fan-out, the server SIGKILLed and
restarted with calls in flight and in the blind window, garbage and forgery on session
subjects, a call longer than nats-server's default response window under rights.

Completions are counted at the callee (each serving process appends to its own file), so
"answered once" is checked where the work is done, not only where the answer arrives.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from channels import subjects
from channels.bus import Bus
from channels.errors import CallFailed, Unavailable
from channels.messages import Call, Cancel, decode, encode
from channels.permissions import rights
from channels.process import spawn_tied
from channels.server import running_server

pytestmark = pytest.mark.anyio

PEER = r"""
import os, sys, time
from functools import partial
import anyio
from channels.bus import Bus

url, session, peer, log_path = sys.argv[1:5]
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

async def handler(call):
    i = call.args["i"]
    os.write(log, b"start %d\n" % i)
    await anyio.sleep(call.args.get("sleep", 0))
    if call.args.get("spin"):
        end = time.perf_counter() + call.args["spin"]
        while time.perf_counter() < end:
            pass
    os.write(log, b"done %d %.6f\n" % (i, time.monotonic()))
    return {"i": i, "pid": os.getpid()}

async def main():
    bus = await Bus.connect(url, session=session, name=peer)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(bus.serve, peer, handler, concurrency=1000))
        os.write(log, b"ready\n")
        await anyio.sleep_forever()

anyio.run(main)
"""


class Served:
    """`n` processes serving one peer name; each logs its calls to its own file."""

    def __init__(self, tmp: Path, url: str, session: str, peer: str, n: int):
        self.logs = [tmp / f"{peer}-{k}.log" for k in range(n)]
        self.procs = [
            spawn_tied(
                [sys.executable, "-c", PEER, url, session, peer, str(log)],
                log.with_name(log.name + ".out"),
            )
            for log in self.logs
        ]

    async def ready(self, timeout: float = 60) -> None:
        with anyio.fail_after(timeout):
            while not all(b"ready" in _read(log) for log in self.logs):
                for proc, log in zip(self.procs, self.logs, strict=True):
                    if proc.poll() is not None:
                        out = _read(log.with_name(log.name + ".out"))[-2000:]
                        raise AssertionError(f"serving process exited: {out!r}")
                await anyio.sleep(0.05)

    def lines(self, k: int, what: str) -> list[int]:
        prefix = what.encode() + b" "
        return [
            int(line.split()[1])
            for line in _read(self.logs[k]).splitlines()
            if line.startswith(prefix)
        ]

    def finished(self, k: int) -> dict[int, float]:
        """When each call finished in process k (`time.monotonic()`, one clock for all)."""
        return {
            int(line.split()[1]): float(line.split()[2])
            for line in _read(self.logs[k]).splitlines()
            if line.startswith(b"done ")
        }

    def kill(self, k: int) -> None:
        self.procs[k].send_signal(signal.SIGKILL)
        self.procs[k].wait()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


async def test_the_only_callee_sigkilled_fails_ten_calls_within_three_heartbeats(
    tmp_path, nats_server, session_id
):
    beat = 1.0
    served = Served(tmp_path, nats_server.url, session_id, "worker", 1)
    client = await Bus.connect(nats_server.url, session=session_id, name="client", heartbeat=beat)
    outcomes: dict[int, tuple[BaseException | None, float]] = {}

    async def one(i: int) -> None:
        try:
            await client.call("worker", "x", args={"i": i, "sleep": 60}, timeout=120)
            outcomes[i] = (None, time.monotonic())
        except CallFailed as e:
            outcomes[i] = (e, time.monotonic())

    try:
        await served.ready()
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
            with anyio.fail_after(30):
                while len(served.lines(0, "start")) < 10:
                    await anyio.sleep(0.05)
            await anyio.sleep(beat)  # acknowledged and heartbeating, mid-call
            served.kill(0)
            killed = time.monotonic()
    finally:
        served.close()
        await client.close()
    assert sorted(outcomes) == list(range(10))
    assert all(isinstance(e, Unavailable) for e, _ in outcomes.values()), outcomes
    waited = max(t for _, t in outcomes.values()) - killed
    assert waited < 3 * beat, f"took {waited:.2f}s to notice a dead callee (beat {beat}s)"
    assert "stopped serving" in str(next(iter(outcomes.values()))[0])


async def test_one_of_three_processes_killed_mid_fan_out_every_call_answered_once(
    tmp_path, nats_server, session_id
):
    n = 1000
    served = Served(tmp_path, nats_server.url, session_id, "pool", 3)
    client = await Bus.connect(nats_server.url, session=session_id, name="client", heartbeat=1.0)
    answers: dict[int, dict] = {}
    failures: list[CallFailed] = []
    limiter = anyio.Semaphore(300)  # a fan-out with a bound on what is in flight

    async def one(i: int) -> None:
        async with limiter:
            try:
                reply = await client.call("pool", "x", args={"i": i, "sleep": 0.2}, timeout=120)
                answers[i] = reply.value
            except CallFailed as e:
                failures.append(e)

    try:
        await served.ready()
        pids = [p.pid for p in served.procs]
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
            with anyio.fail_after(60):
                while sum(len(served.lines(k, "done")) for k in range(3)) < n // 3:
                    await anyio.sleep(0.01)
            held_when_killed = set(served.lines(0, "start")) - set(served.lines(0, "done"))
            killed_at = time.monotonic()
            served.kill(0)
    finally:
        served.close()
        await client.close()
    assert not failures, failures[:3]
    assert sorted(answers) == list(range(n))
    assert all(answers[i]["i"] == i for i in range(n))
    done = [Counter(served.lines(k, "done")) for k in range(3)]
    # No live process ran a call twice, and no call ran on both survivors.
    assert all(c <= 1 for k in (1, 2) for c in done[k].values())
    assert not set(done[1]) & set(done[2])
    # The killed process's unfinished calls moved to the survivors and were answered there.
    assert held_when_killed, "the kill came when the process held no call: nothing was tested"
    assert all(answers[i]["pid"] in pids[1:] for i in held_when_killed)
    # A call counts twice only if the dead process finished it but died before its answer
    # left (nothing can save that answer); every such call was answered by a survivor.
    twice = set(done[0]) & (set(done[1]) | set(done[2]))
    assert all(answers[i]["pid"] != pids[0] for i in twice)
    # How many depends on how many of a wave of handlers had finished, answers not yet
    # flushed, at the instant of the kill; but only those: none finished well before it.
    finished = served.finished(0)
    late = {i: round(killed_at - finished[i], 3) for i in twice}
    assert all(ago < 1.0 for ago in late.values()), f"ran twice, finished long before: {late}"
    print(f"held by the killed process: {len(held_when_killed)}, ran twice: {len(twice)}")


POOL_COUNCIL = r"""
import os, time
from council import Council, Function

def pool(i: int, sleep: float = 0.0) -> dict:
    log = os.path.join(os.environ["POOL_LOGS"], f"{os.getpid()}.log")
    with open(log, "a") as f:
        f.write(f"start {i}\n")
    time.sleep(sleep)
    with open(log, "a") as f:
        f.write(f"done {i}\n")
    return {"i": i, "pid": os.getpid()}

council = Council(entry="pool", peers=[Function(pool)])
"""


async def test_council_serve_three_times_one_killed_mid_fan_out_all_answered_once(
    tmp_path, nats_server, session_id, monkeypatch
):
    """The same, through the CLI: `council serve` the same peer 3 times, SIGKILL one."""
    (tmp_path / "pool_council.py").write_text(POOL_COUNCIL)
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setenv("POOL_LOGS", str(logs))
    argv = [sys.executable, "-m", "council.cli", "serve", f"{tmp_path}/pool_council.py:council"]
    argv += ["--peer", "pool", "--nats", nats_server.url, "--session", session_id]
    outs = [tmp_path / f"serve-{k}.out" for k in range(3)]
    procs = [spawn_tied(argv, out) for out in outs]
    client = await Bus.connect(nats_server.url, session=session_id, name="client", heartbeat=1.0)
    n = 300
    answers: dict[int, dict] = {}
    failures: list[CallFailed] = []

    def done(pid: int) -> list[int]:
        text = _read(logs / f"{pid}.log").decode()
        return [int(x.split()[1]) for x in text.splitlines() if x.startswith("done ")]

    async def one(i: int) -> None:
        try:
            answers[i] = (await client.call("pool", args={"i": i, "sleep": 0.3}, timeout=120)).value
        except CallFailed as e:
            failures.append(e)

    try:
        with anyio.fail_after(60):
            while not all(b"serving 'pool'" in _read(out) for out in outs):
                assert all(p.poll() is None for p in procs), [_read(o)[-500:] for o in outs]
                await anyio.sleep(0.05)
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
            with anyio.fail_after(60):
                while len(done(procs[0].pid)) < 5:
                    await anyio.sleep(0.01)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
        await client.close()
    assert not failures, failures[:3]
    assert sorted(answers) == list(range(n))
    pids = [p.pid for p in procs]
    moved = {i for i in range(n) if answers[i]["pid"] != pids[0]} & (
        set(
            int(x.split()[1])
            for x in _read(logs / f"{pids[0]}.log").decode().splitlines()
            if x.startswith("start ")
        )
    )
    assert moved, "the killed process held no call when it died: nothing moved"
    survivors = Counter(done(pids[1])) + Counter(done(pids[2]))
    assert max(survivors.values()) == 1, "a live process ran a call twice"
    assert all(answers[i]["pid"] in pids[1:] for i in moved)


async def test_server_sigkilled_and_restarted_with_calls_in_flight_and_in_the_blind_window(
    tmp_path, own_server, session_id
):
    served = Served(tmp_path, own_server.url, session_id, "steady", 1)
    client = await Bus.connect(own_server.url, session=session_id, name="client", heartbeat=1.0)
    answers: dict[int, object] = {}
    failures: list[CallFailed] = []
    blind: list[bool] = []
    deadline = 60.0

    async def one(i: int, *, in_blind: bool = False) -> None:
        if in_blind:
            blind.append(client.nc.is_connected)  # it has not noticed the server is gone
        started = time.monotonic()
        try:
            reply = await client.call("steady", "x", args={"i": i, "sleep": 1.0}, timeout=deadline)
            assert time.monotonic() - started < deadline
            answers[i] = reply.value["i"]
        except CallFailed as e:
            failures.append(e)

    try:
        await served.ready()
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
            with anyio.fail_after(30):
                while len(served.lines(0, "start")) < 200:
                    await anyio.sleep(0.01)
            own_server.process.send_signal(signal.SIGKILL)
            for i in range(200, 250):  # no await in between: sent before the client can notice
                tg.start_soon(lambda i=i: one(i, in_blind=True))
            await anyio.to_thread.run_sync(own_server.process.wait)
            own_server.process = None
            await anyio.to_thread.run_sync(own_server.start)
    finally:
        served.close()
        await client.close()
    assert not failures, failures[:3]
    assert sorted(answers) == list(range(250))
    # How many went out before the client noticed varies with scheduling; some must have.
    assert sum(blind) >= 10, f"only {sum(blind)} of 50 calls were sent in the blind window"
    runs = Counter(served.lines(0, "done"))
    assert sorted(runs) == list(range(250)) and set(runs.values()) == {1}, (
        f"ran twice: {[i for i, c in runs.items() if c > 1]}"
    )


async def test_a_call_to_a_peer_nobody_serves_fails_fast_with_a_recorder_on(
    tmp_path, connect, nats_server, session_id
):
    from council.record import Recorder

    """The recorder's wildcard subscription hides the server's "no responders" from the
    call; the caller's presence probe (outside the session's subjects) still gets it, so the
    call fails as unserved, not after two silent heartbeats (4 s by default)."""
    watcher = await connect("recorder")
    client = await Bus.connect(nats_server.url, session=session_id, name="client")
    assert client.heartbeat == 2.0
    async with Recorder(watcher.nc, session_id, tmp_path / "run.jsonl"):
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"no peer named 'ghost' is serving"):
            await client.call("ghost", "anyone?", timeout=60)
        took = time.monotonic() - started
        # A served peer is not mistaken for an unserved one while the recorder listens.
        async with anyio.create_task_group() as tg:
            peer = await connect("echo")

            async def echo(call):
                return call.prompt

            await tg.start(peer.serve, "echo", echo)
            assert (await client.call("echo", "here", timeout=10)).value == "here"
            tg.cancel_scope.cancel()
    await client.close()
    assert took < client.heartbeat, f"an unserved call took {took:.2f}s with a recorder on"


async def test_a_call_longer_than_its_heartbeat_is_kept_alive_not_failed(connect):
    server = await connect("thinker")
    client = await Bus.connect(
        server.nc.connected_url.geturl(), session=server.session, name="client", heartbeat=0.5
    )

    async def slow(call: Call):
        await anyio.sleep(4.0)  # eight heartbeats, four times the silence that fails a call
        return "thought it through"

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "thinker", slow)
        assert (await client.call("thinker", "x", timeout=30)).value == "thought it through"
        tg.cancel_scope.cancel()
    await client.close()


async def test_a_re_sent_call_runs_once_attached_while_running_and_from_cache_after(connect):
    server, client = await connect("once"), await connect("client")
    runs: Counter[str] = Counter()
    release = anyio.Event()

    async def once(call: Call):
        runs[call.id] += 1
        await release.wait()
        return runs[call.id]

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "once", once)
        call = client.make_call("once", "x", timeout=30)
        results: list[int] = []

        async def send() -> None:
            results.append((await client.send(call)).value)

        async with anyio.create_task_group() as senders:
            senders.start_soon(send)
            while not runs:
                await anyio.sleep(0.01)
            senders.start_soon(send)  # the same call id again, while it runs
            await anyio.sleep(0.2)
            release.set()
        assert results == [1, 1]
        assert (await client.send(call)).value == 1  # after it was answered: from the cache
        assert runs == {call.id: 1}
        # The same id from another caller is another call: never another caller's answer.
        other = await connect("other")
        assert (await other.send(call)).value == 2
        assert runs == {call.id: 2}
        tg.cancel_scope.cancel()


async def test_the_subject_says_who_calls_not_the_body(connect, nats_server, session_id):
    """A body claiming another caller is refused; a reply subject outside the caller's inbox
    gets nothing sent there; another caller cannot cancel someone's call."""
    server, client = await connect("guard"), await connect("client")
    ran: list[str] = []
    started, release = anyio.Event(), anyio.Event()

    async def guard(call: Call):
        ran.append(call.id)
        started.set()
        await release.wait()
        return call.caller

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "guard", guard)
        forged = Call(session=session_id, caller="admin", callee="guard", prompt="x")
        msg = await client.nc.request(
            subjects.call(session_id, "guard", "client"), encode(forged), timeout=5
        )
        failure = decode(msg.data)
        assert (
            failure.kind == "permission_denied" and "claims to be from 'admin'" in failure.message
        )

        # Replies only go into the caller's own inbox: nothing is sent to another's.
        other = await connect("other")
        elsewhere = subjects.inbox_prefix(session_id, "other") + ".stolen"
        sub = await other.nc.subscribe(elsewhere)
        await other.nc.flush()
        honest = Call(session=session_id, caller="client", callee="guard", prompt="x")
        await client.nc.publish(
            subjects.call(session_id, "guard", "client"), encode(honest), reply=elsewhere
        )
        await client.nc.flush()
        await anyio.sleep(0.5)
        assert sub.pending_msgs == 0 and not ran

        # A cancel names its sender too: only the caller may withdraw its call.
        async with anyio.create_task_group() as callers:
            result: list[object] = []

            async def call_it() -> None:
                result.append((await client.call("guard", "y", timeout=30)).value)

            callers.start_soon(call_it)
            await started.wait()
            await other.nc.publish(
                subjects.cancel(session_id, "guard", "other"), encode(Cancel(id=ran[0]))
            )
            await other.nc.flush()
            await anyio.sleep(0.3)
            release.set()
        assert result == ["client"]
        tg.cancel_scope.cancel()


async def test_garbage_on_every_session_subject_never_stops_a_peer(connect, session_id):
    server, client = await connect("sturdy"), await connect("client")

    async def sturdy(call: Call):
        return call.prompt

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "sturdy", sturdy)
        inbox = subjects.inbox_prefix(session_id, "client")
        for subject, reply in [
            (subjects.call(session_id, "sturdy", "client"), ""),  # no reply subject
            (subjects.call(session_id, "sturdy", "client"), inbox + ".x"),
            (subjects.cancel(session_id, "sturdy", "client"), ""),
            (subjects.event(session_id, "sturdy", "step"), ""),
            (inbox + ".1", ""),
        ]:
            for payload in (b"", b"\xff\xfe", b"{}", b'{"type":"working","v":1,"id":5}', b"[]"):
                await client.nc.publish(subject, payload, reply=reply)
        await client.nc.flush()
        assert (await client.call("sturdy", "still here", timeout=10)).value == "still here"
        tg.cancel_scope.cancel()


async def test_a_reply_after_the_default_two_minute_response_window_arrives_under_rights(
    session_id,
):
    """nats-server drops replies after 2 minutes under `allow_responses`; under the rights
    generated now a 150 s call is answered (the real server, the real clock)."""
    r = rights(session_id, {"chair": ["slow"], "slow": []})
    with running_server(config_extra=r.authorization()) as srv:
        user, password = r.credentials("slow")
        callee = await Bus.connect(
            srv.url, session=session_id, name="slow", user=user, password=password
        )
        user, password = r.credentials("chair")
        caller = await Bus.connect(
            srv.url, session=session_id, name="chair", user=user, password=password, heartbeat=10
        )

        async def slow(call: Call):
            await anyio.sleep(150)
            return "worth the wait"

        async with anyio.create_task_group() as tg:
            await tg.start(callee.serve, "slow", slow)
            started = time.monotonic()
            reply = await caller.call("slow", "x", timeout=240)
            assert reply.value == "worth the wait"
            assert time.monotonic() - started >= 150
            tg.cancel_scope.cancel()
        await caller.close()
        await callee.close()
