"""The REPL runtime: real nats-server, real worker subprocesses, real store."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from agents.prompt import PeerSpec
from agents.repl.env import worker_env
from agents.repl.host import Repl
from agents.repl.protocol import ExecResult, clip
from channels import subjects
from channels.bus import Bus
from channels.errors import InvalidName
from channels.messages import Call, Execution, Ref, Reply, Usage, decode
from channels.permissions import rights
from channels.server import running_server
from channels.store import Store
from tests.conftest import pid_alive

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(
    bus: Bus, name: str, handler: Callable[[Call], Awaitable[Any]], concurrency: int = 2000
) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(bus.serve, name, handler, concurrency=concurrency))
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def ok(repl: Repl, code: str, **kw: Any) -> ExecResult:
    result = await repl.execute(code, **kw)
    assert result.status == "ok", result.for_model()
    return result


# -- the namespace ---------------------------------------------------------------------------


async def test_variables_persist_and_a_trailing_expression_is_returned(connect):
    async with Repl(await connect("chair"), agent="chair") as repl:
        first = await ok(repl, "x = 41\nprint('set x')")
        assert first.stdout == "set x\n" and first.value is None
        second = await ok(repl, "x + 1")
        assert second.value == "42"
        assert "=> 42" in second.for_model()
        third = await ok(repl, "y = [x] * 3\ny")
        assert third.value == "[41, 41, 41]"


async def test_errors_come_back_with_only_the_models_frames(connect):
    async with Repl(await connect("chair"), agent="chair") as repl:
        result = await repl.execute("def f(n):\n    return 1 / n\n\nf(0)")
        assert result.status == "error"
        assert "ZeroDivisionError: division by zero" in result.error
        assert 'File "<cell 1>", line 4' in result.error and "return 1 / n" in result.error
        assert "agents/repl" not in result.error and "threading" not in result.error
        syntax = await repl.execute("x = 1 +")
        assert syntax.status == "error" and "SyntaxError" in syntax.error
        assert "ast.py" not in syntax.error and "<cell 2>" in syntax.error
        # An error does not cost the namespace.
        await ok(repl, "z = 5")
        assert (await ok(repl, "f(2) + z")).value == "5.5"


async def test_long_output_is_capped_and_cut_for_the_model_head_and_tail_kept(connect):
    async with Repl(await connect("chair"), agent="chair", output_cap=10_000) as repl:
        result = await ok(repl, "for i in range(5000):\n    print(f'line {i}')")
        assert result.stdout.startswith("line 0\n") and result.stdout.endswith("line 4999\n")
        assert result.stdout_cut > 0 and "over the output cap" in result.stdout
        shown = result.for_model(2_000)
        assert len(shown) <= 2_100
        assert shown.startswith("line 0") and "line 4999" in shown
        assert "characters cut from the middle" in shown
    text = "".join(f"{i:05d}" for i in range(10_000))
    cut = clip(text, 1_000)
    assert len(cut) <= 1_000 and cut[:10] == text[:10] and cut[-10:] == text[-10:]
    assert f"of {len(text):,}" in cut


async def test_help_and_show_vars(connect):
    peers = [PeerSpec("critic", "finds faults in a draft"), PeerSpec("code-reviewer", "reviews")]
    async with Repl(await connect("chair"), agent="chair", peers=peers) as repl:
        shown = (await ok(repl, "help()")).stdout
        assert "critic(prompt: str, context=None) -> str: finds faults in a draft" in shown
        assert "code_reviewer(" in shown and ".map(" in shown and "FINAL" in shown
        listing = (await ok(repl, "notes = ['a', 'b']\ncount = 3\nSHOW_VARS()")).stdout
        assert "notes: list (len 2)" in listing and "count: int" in listing
        assert "critic" not in listing


async def test_peer_names_that_cannot_be_functions_are_refused(connect):
    bus = await connect("chair")
    with pytest.raises(InvalidName, match="built-in"):
        Repl(bus, agent="chair", peers=[PeerSpec("list")])
    with pytest.raises(InvalidName, match="REPL's own names"):
        Repl(bus, agent="chair", peers=[PeerSpec("store")])


# -- limits: time, memory, crashes -----------------------------------------------------------


async def test_an_endless_loop_is_stopped_and_the_next_execution_works(connect):
    async with Repl(await connect("chair"), agent="chair", exec_timeout=1.0) as repl:
        await ok(repl, "kept = 1")
        old_pid = repl.pid
        started = time.monotonic()
        result = await repl.execute("while True:\n    pass")
        assert result.status == "timeout" and result.state_lost
        assert time.monotonic() - started < 1.0 + 4.0
        assert "variables were lost" in result.for_model().lower()
        assert not pid_alive(old_pid) and repl.pid != old_pid
        assert (await ok(repl, "1 + 1")).value == "2"
        gone = await repl.execute("kept")
        assert gone.status == "error" and "NameError" in gone.error
        assert any("restart" in n for n in gone.notes)


async def test_a_parent_deadline_cuts_the_execution_short(connect):
    bus = await connect("chair")
    async with Repl(bus, agent="chair", exec_timeout=60) as repl:
        parent = bus.make_call("chair", "task", timeout=1.0)
        started = time.monotonic()
        result = await repl.execute("import time\ntime.sleep(30)", parent=parent)
        assert result.status == "timeout" and time.monotonic() - started < 5


async def test_running_out_of_memory_is_reported_not_fatal(connect):
    async with Repl(await connect("chair"), agent="chair", memory_mb=200) as repl:
        await ok(repl, "kept = 'still here'")
        one_shot = await repl.execute("huge = bytearray(8 * 1024 ** 3)")
        assert one_shot.status == "error" and "MemoryError" in one_shot.error
        assert any("200 MB" in n for n in one_shot.notes)
        growing = await repl.execute(
            "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"
        )
        assert growing.status in ("error", "crashed")
        assert "MemoryError" in (growing.error or "") or growing.state_lost
        after = await ok(repl, "chunks = None\n'alive'")
        assert after.value == "'alive'"
        if growing.status == "error":
            assert (await ok(repl, "kept")).value == "'still here'"


async def test_os_exit_is_reported_as_a_crash_and_the_worker_comes_back(connect):
    async with Repl(await connect("chair"), agent="chair") as repl:
        old_pid = repl.pid
        result = await repl.execute("import os\nos._exit(1)")
        assert result.status == "crashed" and result.state_lost
        assert "exit code 1" in result.for_model() and "lost" in result.for_model()
        assert repl.pid != old_pid and not pid_alive(old_pid)
        assert (await ok(repl, "'back'")).value == "'back'"
        assert repl.restarts == 1


async def test_closing_the_repl_ends_the_worker(connect):
    repl = Repl(await connect("chair"), agent="chair")
    await repl.start()
    pid = repl.pid
    assert pid is not None and pid_alive(pid)
    await repl.close()
    assert not pid_alive(pid)


async def test_two_repls_of_one_agent_keep_separate_namespaces(connect):
    bus = await connect("chair")
    async with Repl(bus, agent="chair") as a, Repl(bus, agent="chair") as b:
        assert a.name == "chair-repl" and b.name != a.name
        await ok(a, "who = 'a'")
        await ok(b, "who = 'b'")
        assert (await ok(a, "who")).value == "'a'"
        assert (await ok(b, "who")).value == "'b'"


# -- secrets and files ------------------------------------------------------------------------


async def test_secrets_in_the_parents_environment_are_not_visible(connect, monkeypatch):
    secrets = {
        "OPENAI_API_KEY": "sk-test-123456",
        "ANTHROPIC_API_KEY": "sk-ant-7890",
        "MY_SERVICE_TOKEN": "tok-abc",
        "DB_PASSWORD": "hunter2",
        "DATABASE_URL": "postgres://app:pa55word@db:5432/x",
        "NATS_PASSWORD": "natspw",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HARMLESS_SETTING", "visible")
    monkeypatch.setenv("LANG", "C.UTF-8")
    async with Repl(await connect("chair"), agent="chair") as repl:
        env = (await ok(repl, "import os\ndict(os.environ)")).value
        raw = (await ok(repl, "open('/proc/self/environ', 'rb').read().decode()")).value
        cwd = (await ok(repl, "(os.getcwd(), os.listdir('.'))")).value
    for k, v in secrets.items():
        assert k not in env and v not in env and v not in raw
    # An allow-list: even a harmless name nobody listed stays out; the locale passes.
    assert "HARMLESS_SETTING" not in env and "'LANG': 'C.UTF-8'" in env
    assert "council-repl-chair-" in cwd and cwd.endswith("[])")
    assert "OPENAI_API_KEY" not in worker_env({"OPENAI_API_KEY": "x"}, workdir="/tmp")


# -- calls from code ------------------------------------------------------------------------


async def test_calls_from_code_single_start_and_parallel(connect):
    seen: list[Call] = []

    async def echo(call: Call) -> Any:
        seen.append(call)
        if call.prompt == "fail":
            raise ValueError("cannot do that")
        return {"echo": call.prompt, "n": call.args.get("n")}

    bus, peer = await connect("chair"), await connect("echo")
    async with (
        serving(peer, "echo", echo),
        Repl(bus, agent="chair", peers=[PeerSpec("echo", "echoes")]) as repl,
    ):
        parent = bus.make_call("chair", "task", timeout=30)
        single = await ok(repl, "echo('hi', n=1)", parent=parent)
        assert single.value == "{'echo': 'hi', 'n': 1}"
        started = await ok(repl, "h = echo.start('later')\nprint(h)\nh.result()['echo']")
        assert started.value == "'later'" and "<call echo('later')" in started.stdout
        both = await ok(
            repl, "parallel(echo.start('a'), (echo, 'b', {'n': 2}), echo.start('fail'))"
        )
        assert both.value.startswith("[{'echo': 'a', 'n': None}, {'echo': 'b', 'n': 2}, PeerError(")
        raised = await repl.execute("echo('fail')")
        assert raised.status == "error" and "PeerError" in raised.error
        assert "cannot do that" in raised.error and "concurrent" not in raised.error
    first = seen[0]
    assert first.caller == repl.name and first.parent is not None
    assert first.depth == parent.depth + 1 and first.root == parent.id
    assert first.deadline is not None and first.deadline <= parent.deadline


async def test_a_thousand_calls_from_one_map_are_in_flight_together(connect):
    in_flight = peak = 0

    async def slow(call: Call) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await anyio.sleep(0.05)
        finally:
            in_flight -= 1
        return call.prompt.upper()

    bus, peer = await connect("chair"), await connect("slow")
    peers = [PeerSpec("slow"), PeerSpec("wide", target="slow", concurrency=1000)]
    async with serving(peer, "slow", slow), Repl(bus, agent="chair", peers=peers) as repl:
        bounded = await ok(
            repl, "out = slow.map([f'p{i}' for i in range(1000)])\nout[:3] + out[-1:]"
        )
        assert bounded.value == "['P0', 'P1', 'P2', 'P999']"
        assert peak == 64  # the default per-peer limit, reached and never passed
        peak = 0
        started = time.monotonic()
        wide = await ok(repl, "len(wide.map('x', contexts=range(1000)))")
        assert wide.value == "1000"
        assert peak > 500, peak  # really in flight together, not one after another
        assert time.monotonic() - started < 5
        stats = await repl.stats()
        assert stats.in_flight_max["wide"] > 500 and stats.in_flight_max["slow"] == 64


async def test_failures_inside_a_fan_out_come_back_per_item(connect):
    async def picky(call: Call) -> Any:
        if int(call.prompt) % 3 == 0:
            raise ValueError(f"no threes: {call.prompt}")
        return Reply(value=int(call.prompt), usage=Usage(input_tokens=5, model_calls=1))

    bus, peer = await connect("chair"), await connect("picky")
    async with (
        serving(peer, "picky", picky),
        Repl(bus, agent="chair", peers=[PeerSpec("picky")]) as repl,
    ):
        result = await ok(
            repl,
            "out = picky.map([str(i) for i in range(1, 10)])\n"
            "[type(x).__name__ if isinstance(x, CallFailed) else x for x in out]",
        )
        assert result.value == "[1, 2, 'PeerError', 4, 5, 'PeerError', 7, 8, 'PeerError']"
        assert result.usage.model_calls == 6 and result.usage.input_tokens == 30
        message = await ok(repl, "out[2].message")
        assert "no threes: 3" in message.value
        strict = await repl.execute("picky.map(['1', '3', '4'], raise_errors=True)")
        assert strict.status == "error" and "no threes: 3" in strict.error
        unknown = await ok(repl, "picky.map(['1'] * 2, contexts=[None, None]), picky.map([])")
        assert unknown.value == "([1, 1], [])"


async def test_a_peer_that_is_not_serving_fails_typed(connect):
    async with Repl(await connect("chair"), agent="chair", peers=[PeerSpec("ghost")]) as repl:
        result = await ok(repl, "r = ghost.map(['a', 'b'])\n[type(x).__name__ for x in r]")
        assert result.value == "['Unavailable', 'Unavailable']"


# -- the store, context and FINAL -----------------------------------------------------------


async def test_a_40mb_context_ref_loads_lazily_and_a_forwarded_ref_is_never_read(connect):
    bus, peer = await connect("chair"), await connect("echo")
    store = await Store.open(peer.nc, scope=bus.session)
    text = "0123456789" * 4_000_000
    big = await store.put(text)
    other = await store.put("a document the worker only passes on " * 10_000)
    received: list[Any] = []

    async def echo(call: Call) -> str:
        received.append(call.context)
        return "seen"

    async with (
        serving(peer, "echo", echo),
        Repl(bus, agent="chair", peers=[PeerSpec("echo")], context=big) as repl,
    ):
        await ok(repl, "echo('forward the input', context=context)")
        await ok(repl, f"doc = {other.model_dump(by_alias=True)!r}")
        await ok(
            repl,
            "from channels.messages import Ref\nfwd = echo.start('pass it', context=Ref.model_validate(doc))\nfwd.result()",
        )
        assert (await repl.stats()).store_reads == {}
        assert received[0] == big and received[1] == other
        result = await ok(repl, "len(context), context[:5], context[-3:]")
        assert result.value == "(40000000, '01234', '789')"
        await ok(repl, "echo('again', context=context)")  # the loaded value goes as its Ref
        assert received[2] == big
        stats = await repl.stats()
        assert stats.store_reads == {big.digest: 1} and stats.store_writes == 0


async def test_a_big_context_value_travels_by_reference(connect):
    bus, peer = await connect("chair"), await connect("echo")

    async def echo(call: Call) -> Any:
        return call.context.size if isinstance(call.context, Ref) else call.context

    async with (
        serving(peer, "echo", echo),
        Repl(bus, agent="chair", peers=[PeerSpec("echo")]) as repl,
    ):
        assert (await ok(repl, "echo('x', context='small')")).value == "'small'"
        assert (await ok(repl, "echo('x', context='y' * 300_000)")).value == "300000"


async def test_store_functions_in_the_namespace(connect):
    bus = await connect("chair")
    async with Repl(bus, agent="chair") as repl:
        result = await ok(
            repl,
            "r = store.put({'k': [1, 2]})\n"
            "store.bind('count', 1)\n"
            "store.update('count', lambda n: n + 41)\n"
            "(store.get(r), store.lookup('count'), store.lookup('absent', 'dflt'), type(r).__name__)",
        )
    assert result.value == "({'k': [1, 2]}, 42, 'dflt', 'Ref')"
    assert await (await Store.open(bus.nc, scope=bus.session)).lookup("count") == 42


async def test_final_and_final_var_end_the_run_with_the_value(connect):
    bus = await connect("chair")
    async with Repl(bus, agent="chair") as repl:
        result = await ok(repl, "FINAL({'answer': 6 * 7})\nprint('not reached')")
        assert result.final_set and result.final == {"answer": 42} and result.stdout == ""
        assert "FINAL answer set" in result.for_model()
        plain = await ok(repl, "x = 1")
        assert not plain.final_set
        by_name = await ok(repl, "big = 'x' * 2_000_000\nsmall = 3\nFINAL_VAR('big')")
        assert isinstance(by_name.final, Ref) and by_name.final.size == 2_000_000
        store = await Store.open(bus.nc, scope=bus.session)
        assert await store.get(by_name.final) == "x" * 2_000_000
        assert (await ok(repl, "FINAL_VAR('small')")).final == 3
        missing = await repl.execute("FINAL_VAR('nope')")
        assert missing.status == "error" and not missing.final_set
        assert "no variable named 'nope'" in missing.error and "small" in missing.error
        bad = await repl.execute("FINAL(object())")
        assert bad.status == "error" and "JSON-like" in bad.error


async def test_a_ref_final_value_stays_a_ref(connect):
    bus = await connect("chair")
    store = await Store.open(bus.nc, scope=bus.session)
    ref = await store.put("the input " * 50_000)
    async with Repl(bus, agent="chair", context=ref) as repl:
        result = await ok(repl, "FINAL(context)")
        assert result.final == ref
        assert (await repl.stats()).store_reads == {}


async def test_every_execution_is_published_as_an_event(connect, session_id):
    bus = await connect("chair")
    sub = await bus.nc.subscribe(subjects.events(session_id))
    await bus.nc.flush()
    async with Repl(bus, agent="chair", exec_timeout=1) as repl:
        await repl.execute("print('hello')")
        await repl.execute("x = ", record=True)
        await repl.execute("1", record=False)
    events = []
    with anyio.move_on_after(2):
        while len(events) < 2:
            event = decode((await sub.next_msg(timeout=2)).data)
            if isinstance(event, Execution):
                events.append(event)
    assert [(e.code, e.status) for e in events] == [("print('hello')", "ok"), ("x = ", "error")]
    assert events[0].output == "hello" and events[0].peer == "chair"
    assert "SyntaxError" in events[1].output


async def test_worker_starts_fast(connect):
    bus = await connect("chair")
    started = time.perf_counter()
    async with Repl(bus, agent="chair") as repl:
        elapsed = time.perf_counter() - started
        assert (await ok(repl, "import sys\n'litellm' in sys.modules")).value == "False"
    assert elapsed < 5, elapsed


async def test_a_cancelled_execution_kills_the_worker_and_the_next_one_is_told(connect):
    async with Repl(await connect("chair"), agent="chair") as repl:
        await ok(repl, "kept = 1")
        pid = repl.pid
        with anyio.move_on_after(0.5):
            await repl.execute("import time\ntime.sleep(30)")
        assert not pid_alive(pid)
        result = await ok(repl, "'fresh'")
        assert result.state_lost and any("cancelled" in n for n in result.notes)
        no_time = await repl.execute(
            "1", parent=Call(session="x", caller="a", callee="b", deadline=time.time() - 1)
        )
        assert no_time.status == "timeout" and not no_time.state_lost


async def test_a_worker_killed_between_executions_is_replaced_with_a_notice(connect):
    async with Repl(await connect("chair"), agent="chair") as repl:
        os.kill(repl.pid, 9)
        with anyio.fail_after(5):
            while repl.alive:
                await anyio.sleep(0.01)
        result = await ok(repl, "'replaced'")
        assert result.state_lost and any("SIGKILL" in n for n in result.notes)


async def test_with_rights_the_worker_gets_its_credentials_on_stdin_only(session_id):
    """Under NATS rights the worker connects as its own user; its password is in no argv/env."""
    grants = rights(
        session_id,
        {"chair": ["echo", "chair-repl"], "chair-repl": ["echo"], "echo": [], "secret": []},
    )
    with running_server(config_extra=grants.authorization()) as server:

        async def bus_for(peer: str) -> Bus:
            user, password = grants.credentials(peer)
            return await Bus.connect(
                server.url, session=session_id, name=peer, user=user, password=password
            )

        agent, peer = await bus_for("chair"), await bus_for("echo")
        user, password = grants.credentials("chair-repl")

        async def echo(call: Call) -> str:
            return f"echo {call.prompt}"

        try:
            peers = [PeerSpec("echo"), PeerSpec("secret")]
            async with (
                serving(peer, "echo", echo),
                Repl(agent, agent="chair", peers=peers, user=user, password=password) as repl,
            ):
                assert (await ok(repl, "echo('hi')")).value == "'echo hi'"
                refused = await repl.execute("secret('let me in')")
                assert refused.status == "error" and "PermissionDenied" in refused.error
                seen = await ok(
                    repl,
                    "import os\n"
                    "open(f'/proc/{os.getpid()}/cmdline', 'rb').read().decode() + "
                    "open(f'/proc/{os.getpid()}/environ', 'rb').read().decode()",
                )
                assert password not in seen.value and "agents.repl.worker" in seen.value
        finally:
            await agent.close()
            await peer.close()
