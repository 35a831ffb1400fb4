"""What a running session is doing, one line per event, for a person watching `council run`.

It only listens to the session's events (agent steps, model completions, REPL
executions, logs): fire-and-forget messages, so watching never slows or changes a run.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from channels import subjects
from channels.bus import Bus, settle
from channels.errors import MalformedMessage
from channels.messages import Completion, Execution, Log, Step, decode


def line(event: object, started: float) -> str | None:
    """One short line for an event, or None for an event not worth a line."""
    at = f"{time.time() - started:7.2f}s"
    if isinstance(event, Step):
        what = f"turn {event.n} {event.phase}" + (f": {event.detail}" if event.detail else "")
    elif isinstance(event, Completion):
        cost = "" if event.usage.cost is None else f", ${event.usage.cost:.4f}"
        what = f"{event.model}: {event.usage.input_tokens}+{event.usage.output_tokens} tokens{cost}"
    elif isinstance(event, Execution):
        first = event.code.strip().splitlines()[0] if event.code.strip() else ""
        what = f"ran code ({event.status}): {first[:60]}"
    elif isinstance(event, Log):
        what = f"{event.level}: {event.event}"
    else:
        return None
    return f"{at}  {event.peer:<16} {what}"  # type: ignore[attr-defined]


async def watch(
    bus: Bus,
    out: TextIO | None = None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Print the session's events on `out` (stderr by default) until cancelled."""
    out = out or sys.stderr
    started = time.time()
    send, receive = anyio.create_memory_object_stream[bytes](1000)

    async def on_event(msg: Msg) -> None:
        try:
            send.send_nowait(msg.data)
        except anyio.WouldBlock:
            pass  # a display may drop lines; the run must not wait for it

    sub = await bus.nc.subscribe(f"{subjects.PREFIX}.{bus.session}.event.>", cb=on_event)
    await settle(bus.nc)
    task_status.started()
    try:
        async with receive:
            async for data in receive:
                try:
                    text = line(decode(data), started)
                except MalformedMessage:
                    continue
                if text:
                    print(text, file=out, flush=True)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await sub.unsubscribe()
            except Exception:
                pass
