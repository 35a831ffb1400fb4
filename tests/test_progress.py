"""The progress display: real peers on a real nats-server, watched as a log and as a live tree."""

from __future__ import annotations

import io
import re
import threading
import time

import anyio
import pyte
import pytest
from wcwidth import wcswidth

from channels.messages import Call, Failure, Reply, Step, Usage
from council import progress
from council.progress import Progress, _LiveView, render, watch

pytestmark = pytest.mark.anyio

FAN = 30
BAD = {3, 11, 20}  # the llm calls that fail
USE = Usage(input_tokens=10, output_tokens=5, cost=0.001, model_calls=1)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


async def start_council(connect, tg, gate: anyio.Event | None = None) -> None:
    """chair -> critic_a (fans out FAN llm calls, some failing) and critic_b (one llm call)."""
    llm, a, b, chair = [await connect(n) for n in ("llm", "critic_a", "critic_b", "chair")]

    async def on_llm(call: Call) -> Reply:
        n = int(call.prompt.split()[-1])
        if n in BAD:
            raise RuntimeError(f"model refused chunk {n}")
        if n == 0 and gate is not None:
            await gate.wait()  # one call stays running until the test has seen it
        await anyio.sleep(0.01 * (n % 5))
        return Reply(value=f"summary {n}", usage=USE)

    def fan_out(bus, prompts: list[str]):
        async def handler(call: Call) -> Reply:
            total = Usage()

            async def one(p: str) -> None:
                nonlocal total
                try:
                    total = total + (await bus.call("llm", p, parent=call)).usage
                except Exception:
                    pass

            async with anyio.create_task_group() as tg2:
                for p in prompts:
                    tg2.start_soon(one, p)
            return Reply(value="reviewed", usage=total)

        return handler

    async def on_chair(call: Call) -> Reply:
        for n in (1, 2):
            await chair.publish(Step(session=chair.session, peer="chair", call=call.id, n=n))
        replies: list[Reply] = []

        async def ask(who: str) -> None:
            replies.append(await chair.call(who, f"critique: {call.prompt}", parent=call))

        async with anyio.create_task_group() as tg2:
            tg2.start_soon(ask, "critic_a")
            tg2.start_soon(ask, "critic_b")
        return Reply(value="verdict", usage=sum((r.usage for r in replies), Usage()))

    await tg.start(llm.serve, "llm", on_llm)
    await tg.start(a.serve, "critic_a", fan_out(a, [f"chunk {i}" for i in range(FAN)]))
    await tg.start(b.serve, "critic_b", fan_out(b, ["chunk 99"]))
    await tg.start(chair.serve, "chair", on_chair)


async def test_plain_lines_name_calls_answers_and_failures(connect):
    out = io.StringIO()
    async with anyio.create_task_group() as tg:
        await start_council(connect, tg)
        runner = await connect("runner")
        watching = anyio.CancelScope()

        async def watcher(*, task_status=anyio.TASK_STATUS_IGNORED):
            with watching:
                await watch(runner, out, task_status=task_status)

        await tg.start(watcher)
        reply = await runner.call("chair", "the design doc", timeout=20)
        with anyio.fail_after(10):
            while f"chair            ok call={reply.id[:8]}" not in out.getvalue():
                await anyio.sleep(0.02)
        watching.cancel()
        tg.cancel_scope.cancel()
    text = out.getvalue()
    assert "\x1b[" not in text  # no terminal codes in a log
    lines = text.splitlines()
    assert len([x for x in lines if "-> llm call=" in x]) == FAN + 1
    assert len([x for x in lines if re.search(r"critic_a\s+-> llm call=\w+ parent=", x)]) == FAN
    assert any(re.search(r"runner\s+-> chair call=\w+ prompt=\"the design doc\"", x) for x in lines)
    failed = [x for x in lines if " failed call=" in x]
    assert len(failed) == len(BAD)
    assert all("kind=peer_error" in x and "model refused chunk" in x for x in failed)
    assert len([x for x in lines if re.search(r"llm\s+ok call=", x)]) == FAN + 1 - len(BAD)
    assert "turn 2 start" in text
    # The root's answer carries the subtree's usage: 28 successful model calls.
    ok_root = next(x for x in lines if f"ok call={reply.id[:8]}" in x)
    assert f"tokens={15 * (FAN + 1 - len(BAD))}" in ok_root, ok_root


def screen_of(text: str, columns: int = 160, rows: int = 40) -> list[str]:
    """What a terminal shows after receiving `text` (a VT100 emulator, with the usual
    newline-is-CR-LF of a terminal's output)."""
    screen = pyte.Screen(columns, rows)
    screen.set_mode(pyte.modes.LNM)
    pyte.Stream(screen).feed(text)
    return [row.rstrip() for row in screen.display]


def shown(text: str, columns: int = 160, rows: int = 40) -> str:
    return "\n".join(row for row in screen_of(text, columns, rows) if row)


def frames_in(text: str) -> int:
    return len(re.findall(r"\d+ calls?: \d+ running", text))


async def test_terminal_shows_a_live_tree_with_folded_fan_out(connect, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("LINES", "40")
    out = FakeTTY()
    gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        await start_council(connect, tg, gate)
        runner = await connect("runner")
        watching = anyio.CancelScope()
        began = time.monotonic()

        async def watcher(*, task_status=anyio.TASK_STATUS_IGNORED):
            with watching:
                await watch(runner, out, task_status=task_status)

        await tg.start(watcher)
        result: list[Reply] = []

        async def ask() -> None:
            result.append(await runner.call("chair", "the design doc", timeout=20))

        tg.start_soon(ask)
        with anyio.fail_after(10):  # while one llm call hangs, the tree says so
            while not re.search(
                r"x 30 \(26 done, 3 failed: peer_error, 1 running\)", out.getvalue()
            ):
                await anyio.sleep(0.02)
        live = shown(out.getvalue())
        assert re.search(r"runner -> chair turn 2 .*running", live), live
        await anyio.sleep(1.2)  # nothing arrives, yet the clock moves: a tick redraw
        ticked = shown(out.getvalue())
        assert ticked != live
        gate.set()
        with anyio.fail_after(10):
            while not result or " 0 running" not in shown(out.getvalue()):
                await anyio.sleep(0.02)
        watching.cancel()
        took = time.monotonic() - began
        tg.cancel_scope.cancel()

    frames = frames_in(out.getvalue())
    assert frames >= 3
    # At most ten frames a second (plus the final one).
    assert frames <= took / progress.REDRAW_INTERVAL + 2
    # The screen holds the last frame and nothing else: each redraw replaced the one before.
    final = shown(out.getvalue()).splitlines()
    assert f"{FAN + 4} calls: 0 running, {FAN + 4 - len(BAD)} ok, {len(BAD)} failed" in final[0]
    body = "\n".join(final[1:])
    assert re.search(r"└── runner -> chair turn 2  \"the design doc\"  ok  ", body), body
    assert re.search(r"├── chair -> critic_a  \"critique: the design doc\"  ok", body), body
    assert "critic_a -> llm x 30 (27 done, 3 failed: peer_error)" in body
    assert re.search(r"critic_b -> llm  \"chunk 99\"  ok  \S+  15 tok \$0\.0010", body), body
    assert "chunk 7" not in body  # the fan-out is one line, not thirty
    assert len(final) == 6
    assert all(len(x) < 160 for x in final)


async def test_a_stalled_display_never_slows_the_run(connect, monkeypatch):
    """The display's writes block; the run still finishes, and the log says what it dropped."""
    monkeypatch.setattr(progress, "QUEUE_BYTES", 4000)
    gate = threading.Event()
    writing = threading.Event()

    class Stalled(io.StringIO):
        def write(self, s: str) -> int:
            writing.set()
            gate.wait(30)
            return super().write(s)

    out = Stalled()
    async with anyio.create_task_group() as tg:
        await start_council(connect, tg)
        runner = await connect("runner")
        watching = anyio.CancelScope()

        async def watcher(*, task_status=anyio.TASK_STATUS_IGNORED):
            with watching:
                await watch(runner, out, task_status=task_status)

        await tg.start(watcher)
        began = time.monotonic()
        with anyio.fail_after(10):
            await runner.call("chair", "the design doc", timeout=20)
        took = time.monotonic() - began
        stalled = writing.is_set() and not gate.is_set()
        gate.set()
        with anyio.fail_after(10):
            while "dropped=" not in out.getvalue():
                await anyio.sleep(0.02)
        watching.cancel()
        tg.cancel_scope.cancel()
    assert stalled  # the display really was stuck while the run went on
    assert took < 10
    assert re.search(r"progress\s+dropped=\d+ \(the display fell behind\)", out.getvalue())


# -- the pure parts: state and rendering without a bus ----------------------------------------


def _fan(state: Progress, parent: Call, n: int, *, failed: int = 0, done: int | None = None):
    done = n - failed if done is None else done
    for i in range(n):
        c = Call(session="s", caller=parent.callee, callee="llm", prompt=f"p{i}", parent=parent.id)
        state.apply(c, 1.0)
        if i < done:
            state.apply(Reply(id=c.id, usage=USE), 2.0)
        elif i < done + failed:
            state.apply(Failure(id=c.id, kind="timeout", message="slow"), 2.0)


def test_render_caps_height_folding_finished_branches_first():
    state = Progress(started=0.0, session="s")
    root = Call(session="s", caller="runner", callee="chair", prompt="go")
    state.apply(root, 0.0)
    kids = []
    for i in range(12):  # twelve different peers: no fan-out fold applies
        k = Call(session="s", caller="chair", callee=f"peer{i}", prompt="x", parent=root.id)
        kids.append(k)
        state.apply(k, 0.5)
        if i != 5:
            state.apply(Reply(id=k.id), 1.0)
    full = render(state, 3.0, height=40)
    assert len(full) == 14
    short = render(state, 3.0, height=6)
    assert len(short) <= 6
    assert any("… 11 finished calls (0 failed)" in x for x in short), short
    assert any('chair -> peer5  "x"  running' in x for x in short), short
    tiny = render(state, 3.0, height=3, width=30)
    assert len(tiny) == 3 and all(len(x) <= 29 for x in tiny)
    assert tiny[-1].startswith("… ")


def test_answers_before_their_call_and_children_before_their_parent_still_pair_up():
    state = Progress(started=0.0)
    parent = Call(session="s", caller="runner", callee="agent", prompt="go")
    child = Call(session="s", caller="agent", callee="llm", prompt="hi", parent=parent.id)
    assert state.apply(Reply(id=child.id, usage=USE), 0.2) == []  # nothing to say yet
    lines = state.apply(child, 0.1)
    assert len(lines) == 2 and "ok call=" in lines[1]
    assert state.roots == [child.id]
    state.apply(parent, 0.3)
    assert state.roots == [parent.id] and state.nodes[parent.id].children == [child.id]
    text = "\n".join(render(state, 1.0))
    assert re.search(r"└── runner -> agent .*\n    └── agent -> llm  \"hi\"  ok", text), text


def test_fold_line_counts_and_running_usage_so_far():
    state = Progress(started=0.0)
    root = Call(session="s", caller="runner", callee="critic_a", prompt="go")
    state.apply(root, 0.0)
    _fan(state, root, 200, failed=3, done=180)
    lines = render(state, 5.0)
    assert "critic_a -> llm x 200 (180 done, 3 failed: timeout, 17 running)" in lines[2]
    # While the root runs, it shows what its finished subcalls spent so far.
    assert "2700 tok $0.1800" in lines[1] and "running" in lines[1]
    assert "200 calls" not in lines[0] and "201 calls: 18 running, 180 ok, 3 failed" in lines[0]


def test_wide_characters_and_escape_codes_in_prompts_leave_the_redraw_intact():
    """A prompt in Chinese takes two cells a character, one with ESC sequences could drive
    the terminal: neither may wrap a line or leave stale rows behind a redraw."""
    columns, rows = 60, 12
    state = Progress(started=0.0, session="s")
    root = Call(session="s", caller="runner", callee="chair", prompt="go")
    state.apply(root, 0.0)
    wide = "审查这份很长的设计文档并找出所有的逻辑问题和事实错误" * 2
    state.apply(
        Call(session="s", caller="chair", callee="critic", prompt=wide, parent=root.id), 0.1
    )
    evil = "clear \x1b[2J\x1b[H and ring \x07"
    state.apply(Call(session="s", caller="chair", callee="llm", prompt=evil, parent=root.id), 0.2)
    out = FakeTTY()
    view = _LiveView(out)
    for now in (1.0, 2.0, 3.0):
        view.show(render(state, now, width=columns, height=rows), columns)
    view.stop()
    screen = screen_of(out.getvalue(), columns, rows)
    visible = [row for row in screen if row]
    assert len(visible) == 4, screen  # header + 3 calls: no stale header from earlier frames
    assert visible[0].endswith("3.0s") and "3 running" in visible[0]
    assert "chair -> critic" in visible[2] and visible[2].endswith("…")
    assert "\\x1b[2J" in visible[3]  # shown as an escape, not obeyed
    assert all(wcswidth(row) <= columns for row in visible)


def test_render_folds_the_deepest_finished_branches_first():
    state = Progress(started=0.0, session="s")
    root = Call(session="s", caller="runner", callee="chair", prompt="go")
    state.apply(root, 0.0)
    for i in range(3):
        agent = Call(session="s", caller="chair", callee=f"agent{i}", prompt="look", parent=root.id)
        state.apply(agent, 0.1)
        for j in range(3):
            c = Call(
                session="s", caller=f"agent{i}", callee=f"tool{j}", prompt="t", parent=agent.id
            )
            state.apply(c, 0.2)
            if (i, j) != (2, 2):
                answer = (
                    Reply(id=c.id, usage=USE)
                    if j
                    else Failure(id=c.id, kind="timeout", message="slow")
                )
                state.apply(answer, 0.3)
        if i < 2:
            state.apply(Reply(id=agent.id), 0.4)
    assert len(render(state, 1.0, height=40)) == 14
    mid = "\n".join(render(state, 1.0, height=12))
    assert mid.count("… 3 finished calls (1 failed)  30 tok $0.0020") == 2, mid
    assert 'chair -> agent0  "look"  ok' in mid and "agent2 -> tool2" in mid
    low = render(state, 1.0, height=8)
    # The agents' level goes too, counting the calls below them; what runs stays in view.
    assert "… 8 finished calls (2 failed)  60 tok $0.0040" in low[2], low
    assert re.search(r"agent2 -> tool2  \"t\"  running", low[-1]), low
