"""Warm REPL workers (agents/repl/pool.py): booted ahead of requests at every depth, one
fresh process per request, so nothing one request's code did reaches the next."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import pytest

from agents.limits import Limits
from agents.llm import LLMPeer
from agents.models import FunctionModel
from agents.rlm import RLMAgent
from tests.conftest import serving, serving_elsewhere

pytestmark = pytest.mark.anyio


def code(body: str) -> str:
    return f"```python\n{body}\n```"


# Everything a hostile request could try to leave behind for the next one in its process.
PLANT = r"""
import builtins, codecs, os, sys, threading, subprocess, time
builtins.PLANTED = "A's secret"
sys.modules["json"].dumps = lambda *a, **k: "hijacked"
codecs.register(lambda name: None)
sys.addaudithook(lambda event, args: None)
threads = threading.active_count()
threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
open("left-behind.txt", "w").write("A's data")
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)  # left-by-A"])
time.sleep(0.2)
FINAL({"cwd": os.getcwd(), "threads": threads, "sleeping": sleeper.poll() is None})
"""

CHECK = r"""
import builtins, json, os, sys, threading
FINAL({
    "cwd": os.getcwd(),
    "planted": hasattr(builtins, "PLANTED"),
    "dumps": json.dumps([1]),
    "threads": threading.active_count(),
    "file": os.path.exists("left-behind.txt"),
})
"""


def left_by_a() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"left-by-A" in open(f"/proc/{entry}/cmdline", "rb").read():
                pids.append(int(entry))
        except OSError:
            pass
    return pids


async def test_nothing_a_request_leaves_in_its_worker_reaches_the_next(nats_server, session_id):
    scripts = iter([PLANT, CHECK])
    agent = RLMAgent("root")  # sandboxed: a PID namespace of its own shows what is left
    model = FunctionModel(lambda m, **_: code(next(scripts, f"FINAL({m[-1]['content']!r})")))
    async with serving(nats_server.url, session_id, agent, LLMPeer("root-model", model)) as c:
        with anyio.fail_after(30):
            await agent.warm()
        first = (await c.call("root", "plant", timeout=60)).value
        with anyio.fail_after(30):
            await agent.warm()
        second = (await c.call("root", "look", timeout=60)).value
    assert isinstance(first, dict) and first["sleeping"], first
    with anyio.fail_after(10):  # the sleeper the first request started died with its worker
        while left_by_a():
            await anyio.sleep(0.1)
    assert second["cwd"] != first["cwd"]  # and a directory of its own
    assert second["planted"] is False and second["dumps"] == "[1]" and second["file"] is False
    assert second["threads"] == first["threads"]  # the planted thread is not there
    assert not await anyio.Path(first["cwd"]).exists()


SPLIT = """
half = -(-len(context) // 2)
answers = rlm.map(["LEVEL {next}"] * 2, contexts=[context[:half], context[half:]])
FINAL(sum(answers))
"""


def tree_model(depth: int):
    """Each agent splits its input in two for two children until `depth`; leaves count."""

    def model(messages: list[dict[str, Any]], **_: Any) -> str:
        first = next(m["content"] for m in messages if m["role"] == "user")
        level = int(first.split("LEVEL ")[1].split()[0]) if "LEVEL " in first else 1
        if level < depth:
            return code(SPLIT.format(next=level + 1))
        return code("FINAL(len(context))")

    return FunctionModel(model)


async def test_a_tree_of_child_agents_runs_on_warm_workers_once_the_pool_knows_its_size(
    nats_server, session_id
):
    agent = RLMAgent(
        "root", can_spawn=True, limits=Limits(depth=3), repl_options={"sandbox": "off"}
    )
    text = "x" * 4000
    async with serving(
        nats_server.url, session_id, agent, LLMPeer("root-model", tree_model(3))
    ) as c:
        with anyio.fail_after(30):
            await agent.warm()
        pool = agent._pool
        assert pool is not None and pool.target == 1
        assert (await c.call("root", "count", context=text, timeout=120)).value == len(text)
        # The tree held 7 workers at once (1 + 2 + 4): 6 had to be booted while it waited.
        assert pool.target == 7 and pool.cold == 6
        with anyio.fail_after(60):
            await agent.warm()  # the replacements boot after the replies
        assert pool.ready == 7
        assert (await c.call("root", "again", context=text, timeout=120)).value == len(text)
        assert pool.cold == 6  # the second tree waited for no boot


async def test_children_as_wide_as_the_concurrency_two_levels_deep_do_not_wait_on_their_parents(
    nats_server, session_id
):
    """With one limit for every depth, the two children would hold both slots while their
    own children waited for one: the request would hang until its deadline."""
    agent = RLMAgent(
        "root",
        can_spawn=True,
        concurrency=2,
        limits=Limits(depth=3),
        repl_options={"sandbox": "off"},
    )
    text = "y" * 1000
    async with serving(
        nats_server.url, session_id, agent, LLMPeer("root-model", tree_model(3))
    ) as c:
        with anyio.fail_after(40):
            reply = await c.call("root", "count", context=text, timeout=40)
    assert reply.value == len(text)


async def test_the_pool_shrinks_back_when_idle_and_replaces_a_worker_killed_while_warm(
    nats_server, session_id, monkeypatch
):
    monkeypatch.setattr("agents.repl.pool.IDLE_SECONDS", 1.0)
    agent = RLMAgent(
        "root", can_spawn=True, limits=Limits(depth=2), repl_options={"sandbox": "off"}
    )
    model = FunctionModel(lambda m, **_: code("import os\nFINAL(os.getpid())"))
    split = FunctionModel(
        lambda m, **_: (
            code('FINAL(rlm.map(["LEVEL 2"] * 3))')
            if "LEVEL" not in m[1]["content"]
            else code("import os, time\ntime.sleep(1)\nFINAL(os.getpid())")
        )
    )
    del model
    async with serving(nats_server.url, session_id, agent, LLMPeer("root-model", split)) as c:
        with anyio.fail_after(30):
            await agent.warm()
        pool = agent._pool
        assert pool is not None
        first = (await c.call("root", "fan", timeout=60)).value
        assert pool.target == 4, first
        with anyio.fail_after(30):
            while pool.target != 1 or pool.ready != 1:  # a second idle: back to one
                await anyio.sleep(0.1)
        # The warm one dies before it is used: the request gets another.
        warm = await agent.warm()
        assert warm is not None
        os.kill(warm, signal.SIGKILL)
        with anyio.fail_after(10):
            while pool._ready[0].alive:
                await anyio.sleep(0.05)
        pids = (await c.call("root", "fan", timeout=60)).value
    assert len(set(pids)) == 3 and warm not in pids


TWO = '''
"""One agent, served by two processes (each with its own pool of REPL workers)."""
from agents.models import FunctionModel
from council.declare import Agent, Council

council = Council(entry="chair", peers=[Agent("chair", model="echo", concurrency=4)])


def _echo(messages, **_):
    return "```python\\nimport time\\ntime.sleep(0.3)\\nFINAL(context)\\n```"


models = {"echo": FunctionModel(_echo)}
'''


async def test_one_agent_served_by_two_processes_keeps_each_request_in_its_own_worker(tmp_path):
    """Both processes' workers may take the same REPL name; each answers only the calls of
    the agent that started it, so no request runs in, or reads, another's namespace."""
    import runpy

    from channels.server import running_server
    from council.declare import load_target
    from council.session import Session

    file = tmp_path / "two.py"
    file.write_text(TWO)
    council = load_target(f"{file}:council")
    models = runpy.run_path(str(file))["models"]
    session = "two" + os.urandom(4).hex()
    with (
        running_server() as server,
        serving_elsewhere(
            f"{file}:council",
            "chair",
            server.url,
            session,
            "--models",
            f"{file}:models",
            env=dict(os.environ),
        ),
    ):
        async with Session(
            council, nats_url=server.url, session=session, local=["chair"], models=models
        ) as s:
            answers: dict[int, Any] = {}

            async def ask(i: int) -> None:
                answers[i] = (await s.ask("echo", context=f"request {i}", timeout=90)).value

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i in range(16):
                        tg.start_soon(ask, i)
    assert answers == {i: f"request {i}" for i in range(16)}


async def test_warm_workers_serve_again_after_the_server_restarts(own_server, session_id):
    """A server restart while workers wait in the pool: they reconnect and serve the next
    request; none is booted in its place."""
    from channels.errors import CallFailed

    agent = RLMAgent("root")  # sandboxed, as by default
    model = FunctionModel(lambda m, **_: code("FINAL(context.upper())"))
    async with serving(own_server.url, session_id, agent, LLMPeer("root-model", model)) as c:
        with anyio.fail_after(30):
            await agent.warm()
        pool = agent._pool
        assert pool is not None
        assert (await c.call("root", "up", context="before", timeout=60)).value == "BEFORE"
        with anyio.fail_after(60):
            await agent.warm()  # the replacement is up: it waits through the restart
        boots = pool.boots
        own_server.restart()
        with anyio.fail_after(60):
            while True:
                try:
                    reply = await c.call("root", "up", context="after", timeout=20)
                    break
                except CallFailed:  # the server is still coming back
                    await anyio.sleep(0.2)
        assert reply.value == "AFTER"
        assert pool.cold == 0 and pool.boots == boots  # the warm worker answered
