"""What a running session is doing, for a person watching `council run`.

On a terminal: a live tree of calls (caller -> callee, prompt preview, state, elapsed time,
tokens and cost, agent turn), redrawn in place at most ten times a second, its height
capped and long fan-outs folded into one line with counts. Anywhere else (a pipe, a log
file, CI): one plain line per call, answer and event, so the log reads top to bottom.

The drawing is rich's (a `Tree` in a `Live`): it measures text in terminal cells, so a
prompt in Chinese or with emoji is clipped to the width instead of wrapping and throwing
the in-place redraw off. What rich has no notion of stays here: folding a fan-out of
thousands of calls into one line, and, when the tree is taller than the terminal, folding
finished branches (deepest first) so that what still runs stays in view.

The watcher only listens. Two wildcard subscriptions (the session's subjects and its
peers' reply inboxes) hand raw bytes to a bounded queue and return: nothing a peer does
ever waits for the display. Parsing, state and drawing happen in the watcher's own task,
writes go through a worker thread (a terminal can stall), and when the display falls too
far behind it drops updates and says so, rather than slowing the run.

`Progress` is the state (fed decoded messages by `apply`), `render` turns it into lines;
both are pure, so the view is tested without a terminal.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import inf
from typing import Any, TextIO

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from rich.console import Console
from rich.live import Live
from rich.text import Text
from rich.tree import Tree

from channels import subjects
from channels.bus import Bus
from channels.errors import MalformedMessage
from channels.messages import (
    Call,
    Cancel,
    Completion,
    Execution,
    Failure,
    Log,
    Message,
    Reply,
    Step,
    decode,
    unbatched,
)
from channels.natsio import settle, unsubscribe

REDRAW_INTERVAL = 0.1
"""At most ten frames a second: faster is flicker, and every frame costs the run CPU."""
TICK = 1.0
"""Redraw this often while calls run, so their elapsed times move even when nothing arrives."""
FOLD = 4
"""More calls than this from one call to one peer show as one line with counts."""
MAX_HEIGHT = 30
QUEUE_BYTES = 32 << 20
"""Undrawn messages held at most; beyond it updates are dropped (and counted), never waited on."""

Spend = tuple[int, int, float | None]
"""Tokens, model calls, cost (None: unknown): plain tuples, as cheap to add as they are to keep."""
NOTHING: Spend = (0, 0, 0.0)

_ANSWERS = (b'{"type":"reply"', b'{"type":"failure"')  # encode() writes `type` first
_EARLY = 10_000  # answers seen before their call (or for calls made before we started)


# -- state ----------------------------------------------------------------------------------


@dataclass
class Node:
    """One call as seen on the bus."""

    id: str
    caller: str
    callee: str
    prompt: str
    parent: str | None
    t0: float
    t1: float | None = None
    status: str = "running"  # "running", "ok", or the Failure kind
    usage: Spend | None = None  # as the answer reported it
    spent: Spend = NOTHING  # by its finished subcalls, counted while it runs
    message: str = ""
    turn: int | None = None
    model: str = ""
    cancelling: bool = False
    children: list[str] = field(default_factory=list)
    groups: dict[tuple[str | None, str], None] = field(default_factory=dict)  # of its subcalls

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def shown_usage(self) -> Spend:
        """What the call has cost: its answer's figure, or what its finished subcalls spent
        (when that is more: a peer that does not sum its subcalls' usage still shows them)."""
        if self.usage is not None and self.usage[0] >= self.spent[0]:
            return self.usage
        return self.spent


@dataclass
class Group:
    """The calls one call made to one peer, counted as they go (so folding is O(1) a frame)."""

    parent: str | None
    callee: str
    caller: str
    members: list[str] = field(default_factory=list)
    parents: dict[str, None] = field(default_factory=dict)  # members that made calls themselves
    running: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    usage: Spend = NOTHING
    t0: float = inf
    t1: float = 0.0

    @property
    def failures(self) -> int:
        return sum(self.failed.values())


@dataclass
class Progress:
    """Everything the display knows about a session, built from its messages in order."""

    started: float
    session: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    roots: list[str] = field(default_factory=list)
    root_groups: dict[tuple[str | None, str], None] = field(default_factory=dict)
    groups: dict[tuple[str | None, str], Group] = field(default_factory=dict)
    total: Spend = NOTHING
    running: int = 0
    ok: int = 0
    failed: int = 0
    dropped: int = 0
    early: dict[str, tuple[Reply | Failure, float]] = field(default_factory=dict)
    orphans: dict[str, list[str]] = field(default_factory=dict)  # parent id -> waiting children

    def apply(self, msg: Message, at: float) -> list[str]:
        """Take in one message received at `at` (wall clock); return its plain log lines."""
        if isinstance(msg, Call):
            return self._call(msg, at)
        if isinstance(msg, Reply | Failure):
            return self._answer(msg, at)
        if isinstance(msg, Cancel):
            node = self.nodes.get(msg.id)
            if node is None or node.done:
                return []
            node.cancelling = True
            return [
                self._line(
                    at, node.caller, f"cancel call={_short(node.id)} {_kv('reason', msg.reason)}"
                )
            ]
        return self._event(msg, at)

    def _call(self, call: Call, at: float) -> list[str]:
        if call.id in self.nodes:
            return []
        node = Node(call.id, call.caller, call.callee, _preview(call.prompt), call.parent, at)
        self.nodes[call.id] = node
        self.running += 1
        key = (call.parent, call.callee)
        parent = self.nodes.get(call.parent) if call.parent else None
        if parent is not None:
            parent.children.append(call.id)
            parent.groups[key] = None
            self.groups[(parent.parent, parent.callee)].parents[parent.id] = None
        else:
            self.roots.append(call.id)
            self.root_groups[key] = None
            if call.parent:
                self.orphans.setdefault(call.parent, []).append(call.id)
        self._join(node)
        if adopted := self.orphans.pop(call.id, []):  # its subcalls were seen first
            for child in adopted:
                self.roots.remove(child)
                node.children.append(child)
            for k in [k for k in self.root_groups if k[0] == call.id]:
                del self.root_groups[k]
                node.groups[k] = None
            self.groups[key].parents[call.id] = None
        out = [
            self._line(
                at,
                call.caller,
                f"-> {call.callee} call={_short(call.id)}"
                + (f" parent={_short(call.parent)}" if call.parent else "")
                + f" {_kv('prompt', node.prompt)}",
            )
        ]
        if (early := self.early.pop(call.id, None)) is not None:
            out += self._answer(*early)
        return out

    def _join(self, node: Node) -> None:
        key = (node.parent, node.callee)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(node.parent, node.callee, node.caller)
        group.members.append(node.id)
        group.running += 1
        group.t0 = min(group.t0, node.t0)

    def _answer(self, answer: Reply | Failure, at: float) -> list[str]:
        node = self.nodes.get(answer.id)
        if node is None:
            if answer.id:
                if len(self.early) >= _EARLY:
                    self.early.pop(next(iter(self.early)))
                self.early[answer.id] = (answer, at)
            return []
        if node.done:
            return []
        node.t1 = at
        u = answer.usage
        node.usage = (u.input_tokens + u.output_tokens, u.model_calls, u.cost)
        group = self.groups[(node.parent, node.callee)]
        group.running -= 1
        group.t1 = max(group.t1, at)
        self.running -= 1
        if isinstance(answer, Reply):
            node.status = "ok"
            group.ok += 1
            self.ok += 1
        else:
            node.status = answer.kind
            node.message = answer.message
            group.failed[answer.kind] = group.failed.get(answer.kind, 0) + 1
            self.failed += 1
        # What this call adds beyond what its finished subcalls already counted upward.
        extra = _minus(node.shown_usage, node.spent)
        group.usage = _plus(group.usage, node.shown_usage)
        self.total = _plus(self.total, extra)
        up = self.nodes.get(node.parent) if node.parent else None
        while up is not None:
            up.spent = _plus(up.spent, extra)
            up = self.nodes.get(up.parent) if up.parent else None
        took = _duration(at - node.t0)
        if isinstance(answer, Reply):
            what = f"ok call={_short(node.id)} took={took}{_usage_kv(node.shown_usage)}"
        else:
            what = (
                f"failed call={_short(node.id)} kind={answer.kind} took={took} "
                f"{_kv('message', _preview(answer.message, 120))}"
            )
        return [self._line(at, node.callee, what)]

    def _event(self, event: object, at: float) -> list[str]:
        node = self.nodes.get(getattr(event, "call", None) or "")
        if isinstance(event, Step):
            if node is not None:
                node.turn = event.n
            what = f"turn {event.n} {event.phase}" + (f": {event.detail}" if event.detail else "")
        elif isinstance(event, Completion):
            if node is not None:
                node.model = event.model
            cost = "" if event.usage.cost is None else f", ${event.usage.cost:.4f}"
            what = f"{event.model}: {event.usage.input_tokens}+{event.usage.output_tokens} tokens{cost}"
        elif isinstance(event, Execution):
            first = event.code.strip().splitlines()[0] if event.code.strip() else ""
            what = f"ran code ({event.status}): {first[:60]}"
        elif isinstance(event, Log):
            what = f"{event.level}: {event.event}"
        else:
            return []
        return [self._line(at, event.peer, what)]  # type: ignore[attr-defined]

    def _line(self, at: float, who: str, what: str) -> str:
        return f"{at - self.started:7.2f}s  {who:<16} {what}"


def _plus(a: Spend, b: Spend) -> Spend:
    cost = None if a[2] is None or b[2] is None else a[2] + b[2]
    return (a[0] + b[0], a[1] + b[1], cost)


def _minus(a: Spend, b: Spend) -> Spend:
    cost = None if a[2] is None or b[2] is None else a[2] - b[2]
    return (a[0] - b[0], a[1] - b[1], cost)


# -- rendering ------------------------------------------------------------------------------


def render(
    state: Progress, now: float, *, width: int = 100, height: int = MAX_HEIGHT, fold: int = FOLD
) -> list[str]:
    """The tree as at most `height` lines, each at most `width` terminal cells.

    Too tall, it folds finished branches into counts, deepest level first, then cuts.
    """
    head = _header(state, now)
    tree = _Tree(state, now, fold)
    root = tree.build(head)
    deepest = tree.deepest
    while tree.rows > height - 1 and deepest >= 0:  # the deepest finished branches go first
        tree = _Tree(state, now, fold, collapse_from=deepest)
        root = tree.build(head)
        deepest -= 1
    lines = _draw(root, width)
    if len(lines) > height:
        keep = max(height - 1, 1)
        lines = [
            *lines[:keep],
            _fit(f"… {len(lines) - keep} more lines (the terminal is too short)", width),
        ]
    return lines


def _draw(tree: Tree, width: int) -> list[str]:
    """The tree as plain lines, drawn by rich into a buffer `width` - 1 cells wide (a line
    that fills the last column makes some terminals wrap)."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=max(width - 1, 10),
        color_system=None,
        force_terminal=False,
        highlight=False,
        emoji=False,
        legacy_windows=False,
    )
    console.print(tree, crop=True, overflow="ellipsis", no_wrap=True)
    return buffer.getvalue().rstrip("\n").split("\n")


def _fit(line: str, width: int) -> str:
    text = Text(line, no_wrap=True, overflow="ellipsis")
    text.truncate(max(width - 1, 10), overflow="ellipsis")
    return text.plain


def _header(state: Progress, now: float) -> str:
    calls = len(state.nodes)
    parts = [f"session {state.session}" if state.session else "council"]
    parts.append(
        f"{calls} call{'s' * (calls != 1)}: {state.running} running, {state.ok} ok, "
        f"{state.failed} failed"
    )
    if use := _usage(state.total):
        parts.append(use)
    parts.append(_duration(now - state.started))
    if state.dropped:
        parts.append(f"({state.dropped} updates dropped: display behind)")
    return "  ".join(parts)


class _Tree:
    """Builds the rich Tree: by group, not by child, so a fan-out of 100k calls is one row."""

    def __init__(self, state: Progress, now: float, fold: int, *, collapse_from: float = inf):
        self.s, self.now, self.fold, self.collapse_from = state, now, fold, collapse_from
        self.rows = 0  # below the header
        self.deepest = 0

    def build(self, head: str) -> Tree:
        root = Tree(_label(head), guide_style="none")
        self._children(self.s.root_groups, root, 0)
        return root

    def _add(self, parent: Tree, label: str) -> Tree:
        self.rows += 1
        return parent.add(_label(label))

    def _children(self, keys: Iterable[tuple[str | None, str]], parent: Tree, depth: int) -> None:
        items: list[tuple[str, object]] = []
        for key in keys:
            group = self.s.groups[key]
            if len(group.members) > self.fold:
                items.append(("group", group))
            else:
                items += [("node", self.s.nodes[m]) for m in group.members]
        items.sort(key=lambda it: it[1].t0)  # type: ignore[attr-defined]
        if items:
            self.deepest = max(self.deepest, depth)
        if depth >= self.collapse_from:
            finished = [it for it in items if self._finished(it)]
            if len(finished) > 1:
                items = [("done", finished)] + [it for it in items if not self._finished(it)]
        for kind, item in items:
            if kind == "node":
                assert isinstance(item, Node)
                self._children(item.groups, self._add(parent, self._node(item)), depth + 1)
            elif kind == "group":
                assert isinstance(item, Group)
                below = self._add(parent, self._group(item))
                busy = [self.s.nodes[m] for m in item.parents if not self.s.nodes[m].done][:2]
                for node in busy:
                    self._children(node.groups, self._add(below, self._node(node)), depth + 2)
            else:
                assert isinstance(item, list)
                self._add(parent, self._finished_line(item))

    def _finished(self, item: tuple[str, object]) -> bool:
        kind, it = item
        if kind == "group":
            return it.running == 0  # type: ignore[attr-defined]
        return self._subtree_done(it)  # type: ignore[arg-type]

    def _subtree_done(self, node: Node) -> bool:
        if not node.done:
            return False
        for key in node.groups:
            group = self.s.groups[key]
            if group.running or not all(self._subtree_done(self.s.nodes[m]) for m in group.parents):
                return False
        return True

    def _count(self, node: Node) -> tuple[int, int]:
        """Calls and failures in a finished subtree."""
        calls, failed = 1, int(node.status != "ok")
        for key in node.groups:
            n, f = self._count_group(self.s.groups[key])
            calls, failed = calls + n, failed + f
        return calls, failed

    def _count_group(self, g: Group) -> tuple[int, int]:
        calls, failed = len(g.members), g.failures
        for m in g.parents:  # only members that made calls have more below them
            n, f = self._count(self.s.nodes[m])
            calls, failed = calls + n - 1, failed + f - int(self.s.nodes[m].status != "ok")
        return calls, failed

    def _finished_line(self, items: list[tuple[str, object]]) -> str:
        calls = failed = 0
        use = NOTHING
        for kind, it in items:
            if kind == "group":
                use = _plus(use, it.usage)  # type: ignore[attr-defined]
                n, f = self._count_group(it)  # type: ignore[arg-type]
            else:
                use = _plus(use, it.shown_usage)  # type: ignore[attr-defined]
                n, f = self._count(it)  # type: ignore[arg-type]
            calls, failed = calls + n, failed + f
        text = f"… {calls} finished calls ({failed} failed)"
        return text + (f"  {u}" if (u := _usage(use)) else "")

    def _node(self, n: Node) -> str:
        who = f"{n.caller} -> {n.callee}"
        if n.turn is not None:
            who += f" turn {n.turn}"
        if n.model:
            who += f" [{n.model}]"
        parts = [who]
        if n.prompt:
            parts.append(f'"{_preview(n.prompt, 40)}"')
        if n.status == "running":
            parts.append("cancelling" if n.cancelling else "running")
        elif n.status == "ok":
            parts.append("ok")
        else:
            parts.append(
                f"failed {n.status}" + (f": {_preview(n.message, 50)}" if n.message else "")
            )
        parts.append(_duration((n.t1 if n.t1 is not None else self.now) - n.t0))
        if use := _usage(n.shown_usage):
            parts.append(use)
        return "  ".join(parts)

    def _group(self, g: Group) -> str:
        counts = [f"{g.ok} done"]
        if g.failures:
            kinds = ", ".join(f"{k}" for k in sorted(g.failed))
            counts.append(f"{g.failures} failed: {kinds}")
        if g.running:
            counts.append(f"{g.running} running")
        end = self.now if g.running else g.t1
        parts = [f"{g.caller} -> {g.callee} x {len(g.members)} ({', '.join(counts)})"]
        parts.append(_duration(max(end - g.t0, 0.0)))
        if use := _usage(g.usage):
            parts.append(use)
        return "  ".join(parts)


def _preview(text: str, n: int = 60) -> str:
    """One line of at most `n` characters, with control characters shown as escapes: a
    prompt holding ESC sequences must not drive the terminal."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], " ".join(text.split()))
    return text if len(text) <= n else text[: n - 1] + "…"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _label(line: str) -> Text:
    return Text(line, no_wrap=True, overflow="ellipsis")


def _short(call_id: str) -> str:
    return call_id[:8]


def _kv(key: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{key}="{escaped}"'


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _tokens(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else str(n)


def _usage(u: Spend) -> str:
    """Tokens and cost when known: nothing for a call that used no model."""
    tokens, calls, cost = u
    if not (tokens or calls):
        return ""
    return f"{_tokens(tokens)} tok " + ("$?" if cost is None else f"${cost:.4f}")


def _usage_kv(u: Spend) -> str:
    tokens, calls, cost = u
    if not (tokens or calls):
        return ""
    return f" tokens={tokens} model_calls={calls} cost=" + (
        "unknown" if cost is None else f"{cost:.6f}"
    )


# -- watching -------------------------------------------------------------------------------


class _Queue:
    """Raw messages from the subscription callbacks, bounded by bytes, never blocking them."""

    def __init__(self, budget: int):
        self.budget = budget
        self.held = 0
        self.items: deque[tuple[bytes, float]] = deque()
        self.dropped = 0
        self.wake = anyio.Event()

    def put(self, data: bytes) -> None:
        if self.held + len(data) > self.budget:
            self.dropped += 1
            return
        self.held += len(data)
        self.items.append((data, time.time()))
        self.wake.set()

    async def on_session(self, msg: Msg) -> None:
        self.put(msg.data)

    async def on_inbox(self, msg: Msg) -> None:
        # Inboxes also carry JetStream answers and store chunks: keep only council answers.
        if msg.data.startswith(_ANSWERS):
            self.put(msg.data)

    async def wait(self, timeout: float | None) -> None:
        if not self.items:
            with anyio.move_on_after(timeout if timeout is not None else inf):
                await self.wake.wait()
        self.wake = anyio.Event()

    def take(self) -> Iterable[tuple[bytes, float]]:
        while self.items:
            data, at = self.items.popleft()
            self.held -= len(data)
            yield data, at


def _size(out: TextIO) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(out.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        size = shutil.get_terminal_size((100, 24))
    return size.columns, size.lines


async def watch(
    bus: Bus,
    out: TextIO | None = None,
    *,
    live: bool | None = None,
    interval: float = REDRAW_INTERVAL,
    max_height: int = MAX_HEIGHT,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Show the session's calls on `out` (stderr by default) until cancelled.

    `live` (default: `out.isatty()`) draws the redrawn tree; otherwise plain lines.
    The last frame stays on screen when the watch ends.
    """
    out = out or sys.stderr
    live = out.isatty() if live is None else live
    state = Progress(started=time.time(), session=bus.session)
    queue = _Queue(QUEUE_BYTES)
    limits = {"pending_msgs_limit": 1_000_000, "pending_bytes_limit": 1 << 30}
    subs = [
        await bus.nc.subscribe(
            subjects.session_wildcard(bus.session), cb=queue.on_session, **limits
        ),
        await bus.nc.subscribe(f"_INBOX.{bus.session}.>", cb=queue.on_inbox, **limits),
    ]
    await settle(bus.nc)
    task_status.started()

    last = -inf  # when the frame was drawn (monotonic)
    dirty = False
    drawn = False
    view = _LiveView(out) if live else None

    def take_in() -> list[str]:
        """Apply what arrived; the plain lines it makes (or a marker line if only drops)."""
        lines: list[str] = []
        for data, at in queue.take():
            try:
                msg = decode(data)
            except MalformedMessage:
                continue
            for one in unbatched(msg):
                lines += state.apply(one, at)
        if queue.dropped != state.dropped:
            lines.append(
                f"{time.time() - state.started:7.2f}s  {'progress':<16} "
                f"dropped={queue.dropped - state.dropped} (the display fell behind)"
            )
            state.dropped = queue.dropped
        return lines

    async def in_thread(fn: Any, *args: Any) -> None:
        # A stalled terminal (a paused pager, a full pipe) holds this thread, whose queue
        # then drops updates, and never the event loop the peers run on.
        await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)

    def put(text: str) -> None:
        out.write(text)
        out.flush()

    async def draw() -> None:
        nonlocal drawn, last, dirty
        assert view is not None
        columns, rows = _size(out)
        lines = render(state, time.time(), width=columns, height=max(3, min(max_height, rows - 1)))
        await in_thread(view.show, lines, columns)
        drawn, last, dirty = True, time.monotonic(), False

    try:
        while True:
            if view is None:
                await queue.wait(None)
                if lines := take_in():
                    await in_thread(put, "".join(f"{line}\n" for line in lines))
                continue
            now = time.monotonic()
            if dirty:
                timeout = max(last + interval - now, 0.0)
            elif state.running:
                timeout = max(last + TICK - now, 0.0)
            else:
                timeout = None
            await queue.wait(timeout)
            dirty = bool(take_in()) or dirty
            now = time.monotonic()
            stale = state.running and now - last >= TICK
            if now - last >= interval and (dirty or stale or not drawn):
                await draw()
    finally:
        await unsubscribe(subs)
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(2):  # the last frame or lines, unless the terminal is stuck
                lines = take_in()
                if view is not None:
                    if drawn or lines:
                        await draw()
                    await in_thread(view.stop)
                elif lines:
                    await in_thread(put, "".join(f"{line}\n" for line in lines))


class _LiveView:
    """The frame on a terminal: rich's Live redraws it in place (it knows how many rows the
    last frame took, in cells); the last frame stays on screen when it stops."""

    def __init__(self, out: TextIO) -> None:
        self.console = Console(
            file=out,
            force_terminal=True,
            color_system=None,
            highlight=False,
            emoji=False,
            legacy_windows=False,
        )
        self.live = Live(
            console=self.console,
            auto_refresh=False,  # we decide when: at most ten frames a second
            redirect_stdout=False,
            redirect_stderr=False,
            vertical_overflow="crop",
        )
        self.started = False

    def show(self, lines: list[str], columns: int) -> None:
        self.console.width = max(columns, 10)
        frame = Text("\n".join(lines), no_wrap=True, overflow="ellipsis")
        if not self.started:
            self.live.start()
            self.started = True
        self.live.update(frame, refresh=True)

    def stop(self) -> None:
        if self.started:
            self.live.stop()
