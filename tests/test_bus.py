"""The bus against a real nats-server: calls, failures, deadlines, cancellation, restarts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import anyio
import pytest

from channels import subjects
from channels.bus import Bus
from channels.errors import (
    BudgetExhausted,
    CallFailed,
    CallTimeout,
    InvalidName,
    PeerError,
    Unavailable,
)
from channels.messages import Call, Failure, Reply, Step, Usage, decode, encode
from channels.natsio import settle
from channels.server import running_server
from tests.conftest import pid_alive

pytestmark = pytest.mark.anyio


async def echo(call: Call):
    return {"prompt": call.prompt, "args": call.args, "depth": call.depth}


async def test_call_and_reply(connect):
    server, client = await connect("echo"), await connect("client")
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "echo", echo)
        reply = await client.call("echo", "hello", args={"n": 3})
        assert reply.value == {"prompt": "hello", "args": {"n": 3}, "depth": 0}
        assert reply.usage.wall_time > 0
        tg.cancel_scope.cancel()


async def test_handler_may_return_a_reply_with_usage(connect):
    server, client = await connect("llm"), await connect("client")

    async def handler(call: Call):
        return Reply(
            value="ok", usage=Usage(input_tokens=5, output_tokens=7, cost=0.01, model_calls=1)
        )

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "llm", handler)
        reply = await client.call("llm", "x")
        assert reply.value == "ok"
        assert (reply.usage.tokens, reply.usage.model_calls, reply.usage.cost) == (12, 1, 0.01)
        tg.cancel_scope.cancel()


async def test_no_responders_is_unavailable_at_once(connect):
    client = await connect("client")
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no peer named 'ghost'"):
        await client.call("ghost", "anyone?", timeout=30)
    assert time.monotonic() - started < 10  # not the 30 s timeout


async def test_malformed_requests_get_bad_request_and_the_peer_keeps_serving(connect):
    server, client = await connect("echo"), await connect("client")
    rng = random.Random(7)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(30)]
    wrong_shapes = [
        b"{}",
        b"null",
        b'"call"',
        b'{"type": "call", "v": 1}',
        b'{"type": "call", "v": 2, "session": "s", "caller": "a", "callee": "echo"}',
        json.dumps({"type": "reply", "v": 1, "id": "x"}).encode(),
        json.dumps({"type": "call", "v": 1, "session": 5, "caller": [], "callee": {}}).encode(),
    ]
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "echo", echo)
        subject = subjects.call(client.session, "echo", "client")
        for payload in garbage + wrong_shapes:
            msg = await client.nc.request(subject, payload, timeout=5)
            failure = decode(msg.data)
            assert isinstance(failure, Failure)
            assert failure.kind == "bad_request"
            assert failure.message
        versioned = await client.nc.request(subject, wrong_shapes[4], timeout=5)
        assert "schema version 2" in decode(versioned.data).message
        reply = await client.call("echo", "still here")
        assert reply.value["prompt"] == "still here"
        tg.cancel_scope.cancel()


async def test_handler_exception_is_peer_error_without_a_traceback(connect):
    server, client = await connect("flaky"), await connect("client")

    async def boom(call: Call):
        raise ValueError("the critic has a bad day")

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "flaky", boom)
        with pytest.raises(PeerError) as err:
            await client.call("flaky", "x")
        assert "ValueError: the critic has a bad day" in err.value.message
        assert "Traceback" not in err.value.message
        tg.cancel_scope.cancel()


async def test_typed_failures_carry_kind_and_partial_result(connect):
    server, client = await connect("spender"), await connect("client")

    async def spend(call: Call):
        raise BudgetExhausted("spent it all", partial={"draft": "half an answer"})

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "spender", spend)
        with pytest.raises(BudgetExhausted) as err:
            await client.call("spender", "x")
        assert err.value.partial == {"draft": "half an answer"}
        assert err.value.kind == "budget_exhausted"
        tg.cancel_scope.cancel()


async def test_deadline_travels_and_the_callee_is_stopped(connect):
    server, client = await connect("slow"), await connect("client")
    seen: dict[str, float] = {}
    stopped = anyio.Event()

    async def slow(call: Call):
        seen["remaining"] = call.remaining()
        try:
            await anyio.sleep(60)
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "slow", slow)
        with pytest.raises(CallTimeout):
            await client.call("slow", "x", timeout=0.5)
        assert 0 < seen["remaining"] <= 0.5
        with anyio.fail_after(5):
            await stopped.wait()
        tg.cancel_scope.cancel()


async def test_child_calls_inherit_depth_and_the_parents_deadline(connect):
    client = await connect("client")
    parent = client.make_call("a", "x", timeout=2)
    child = client.make_call("b", "y", timeout=100, parent=parent)
    assert child.depth == 1 and child.parent == parent.id and child.root == parent.id
    assert child.deadline == parent.deadline


async def test_cancelling_the_caller_cancels_the_callee(connect):
    server, client = await connect("slow"), await connect("client")
    started, cancelled = anyio.Event(), anyio.Event()

    async def slow(call: Call):
        started.set()
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "slow", slow)
        async with anyio.create_task_group() as callers:
            callers.start_soon(client.call, "slow", "x")
            await started.wait()
            callers.cancel_scope.cancel()
        with anyio.fail_after(5):
            await cancelled.wait()
        tg.cancel_scope.cancel()


async def test_two_hundred_calls_run_concurrently_and_replies_match(connect):
    server, client = await connect("sleepy"), await connect("client")
    active = peak = 0

    async def sleepy(call: Call):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await anyio.sleep(0.05)
        active -= 1
        return call.args["i"]

    results: dict[int, object] = {}

    async def one(i: int) -> None:
        results[i] = (await client.call("sleepy", "x", args={"i": i})).value

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "sleepy", sleepy)
        async with anyio.create_task_group() as callers:
            for i in range(200):
                callers.start_soon(one, i)
        tg.cancel_scope.cancel()
    assert results == {i: i for i in range(200)}
    assert peak > 1


async def test_concurrency_limit_is_honoured(connect):
    server, client = await connect("narrow"), await connect("client")
    active = peak = 0

    async def narrow(call: Call):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await anyio.sleep(0.02)
        active -= 1

    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: server.serve(
                "narrow", narrow, concurrency=3, task_status=task_status
            )
        )
        async with anyio.create_task_group() as callers:
            for _ in range(30):
                callers.start_soon(client.call, "narrow", "x")
        tg.cancel_scope.cancel()
    assert peak == 3


async def test_events_are_published(connect):
    client, watcher = await connect("agent"), await connect("watcher")
    sub = await watcher.nc.subscribe(subjects.events(client.session))
    await settle(watcher.nc)  # a lone flush can overtake the SUB
    await client.publish(Step(session=client.session, peer="agent", n=1, detail="thinking"))
    msg = await sub.next_msg(timeout=5)
    step = decode(msg.data)
    assert isinstance(step, Step) and step.detail == "thinking"
    assert msg.subject == subjects.event(client.session, "agent", "step")


async def test_oversize_answer_travels_through_the_store(connect):
    """Over max_payload the answer goes by reference; the caller still gets the value."""
    server, client = await connect("big"), await connect("client")

    async def big(call: Call):
        return "x" * (2 * 1024 * 1024)

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "big", big)
        reply = await client.call("big", "x", timeout=10)
        assert reply.value == "x" * (2 * 1024 * 1024) and not reply.spilled
        kept = await client.call("big", "x", timeout=10, keep_refs=True)
        assert kept.spilled and kept.value.size == 2 * 1024 * 1024
        tg.cancel_scope.cancel()


async def test_bad_names_are_refused_before_anything_is_sent(connect):
    client = await connect("client")
    with pytest.raises(InvalidName, match=r"'\.'"):
        await client.call("bad.name", "x")


async def test_server_restart_mid_call(own_server, session_id):
    server = await Bus.connect(own_server.url, session=session_id, name="slow")
    client = await Bus.connect(own_server.url, session=session_id, name="client")
    outcomes: list[object] = []

    async def slow(call: Call):
        await anyio.sleep(0.3)
        return call.args["i"]

    async def one(i: int) -> None:
        try:
            outcomes.append((await client.call("slow", "x", args={"i": i}, timeout=3)).value)
        except CallFailed as e:
            outcomes.append(e)

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "slow", slow)
        with anyio.fail_after(3 + 5):  # never past the calls' deadline (plus slack)
            async with anyio.create_task_group() as callers:
                for i in range(20):
                    callers.start_soon(one, i)
                await anyio.sleep(0.1)
                own_server.restart()
        assert len(outcomes) == 20
        assert all(isinstance(o, int | CallFailed) for o in outcomes)
        # Same Bus objects, no re-creation: calls work again once the server is back.
        with anyio.fail_after(20):
            while True:
                try:
                    reply = await client.call("slow", "x", args={"i": 99}, timeout=2)
                    break
                except CallFailed:
                    await anyio.sleep(0.2)
        assert reply.value == 99
        tg.cancel_scope.cancel()
    await server.close()
    await client.close()


def test_server_is_gone_after_the_fixture_ends():
    with running_server() as server:
        pid = server.pid
        assert pid_alive(pid)
    assert not pid_alive(pid)


def test_server_dies_with_a_sigkilled_parent(tmp_path):
    script = (
        "import sys, time\n"
        "from channels.server import NatsServer\n"
        f"s = NatsServer(store_dir={str(tmp_path)!r}).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd()
    )
    server_pid = int(parent.stdout.readline())
    assert pid_alive(server_pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while pid_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(server_pid)


async def test_connect_to_nothing_says_what_to_do():
    with pytest.raises(Unavailable, match="--nats"):
        await Bus.connect("nats://127.0.0.1:1", session="s", name="c")


def test_encode_is_what_decode_reads():
    call = Call(session="s", caller="a", callee="b", prompt="p")
    assert decode(encode(call)) == call


async def test_a_peer_answers_as_soon_as_serve_has_started(connect):
    """nats-py's flush can overtake a buffered SUB; `serve` must not report ready before it."""
    server, client = await connect("many"), await connect("client")
    for i in range(300):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, f"p{i}", echo)
            assert (await client.call(f"p{i}", "now", timeout=5)).value["prompt"] == "now"
            tg.cancel_scope.cancel()


async def test_close_with_the_server_gone_does_not_raise(own_server, session_id):
    """`council human` and every peer close their bus when `council run` ends and takes the
    server with it: draining is impossible then, and closing must still end quietly."""
    bus = await Bus.connect(own_server.url, session=session_id, name="late")
    own_server.stop()
    with anyio.fail_after(10):
        while bus.nc.is_connected:
            await anyio.sleep(0.01)
    await bus.close()
    assert bus.nc.is_closed
