"""What every example shares: its command line, where its models come from, and how it
shows what the root model was given.

Three ways to run an example:

- `--model MODEL`: every agent and LLM peer runs on MODEL (any litellm model string;
  its API key comes from this process's environment, as litellm reads it).
- `--local` (the default): offline. SmolLM2-135M, served on loopback by llama-cpp-python
  (the `local` extra), is the sub-LLM that reads pieces of the input. A 135M model cannot
  write useful code, so the agents' root model is a *scripted driver*: a plain function
  that writes the code a capable model would write, turn by turn. Everything else is
  real: the bus, the store, the REPL worker running that code, the calls it makes.
- `--replay CASSETTE`: model and human answers come from a recording; agents and their
  REPL code run for real. No network, no model, no API key.

`--record CASSETTE` records any live run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from agents.models import FunctionModel, estimate_tokens
from channels import subjects
from channels.bus import Bus
from channels.errors import CouncilError, MalformedMessage
from channels.messages import Call, decode
from channels.natsio import settle, unsubscribe
from council.declare import Council, Human

HERE = Path(__file__).resolve().parent
CASSETTES = HERE / "cassettes"

# Placeholders in the declarations: the scripts map them to model objects (Session(models=)).
# `--model` replaces both with a real model string.
DRIVER = "scripted/driver"
LOCAL = "local/smollm2"


class ExampleError(CouncilError):
    """An example used in a way it cannot run; the message says what to pass instead."""


# -- the command line ---------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        epilog=(doc or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--model", "-m", help="any litellm model string, for every agent and LLM")
    how.add_argument(
        "--local",
        action="store_true",
        help="offline: SmolLM2 as the sub-LLM, a scripted driver as the root (the default)",
    )
    how.add_argument(
        "--replay", metavar="CASSETTE", help="answer models and humans from this recording"
    )
    p.add_argument("--record", metavar="CASSETTE", help="record this run to a cassette")
    p.add_argument(
        "--strict",
        action="store_true",
        help="with --replay: fail on any request the recording does not hold, or never made",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for each request")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the answer")
    return p


def mode(args: argparse.Namespace) -> str:
    if args.replay:
        return "replay"
    return "model" if args.model else "local"


# -- models -------------------------------------------------------------------------------


Script = Callable[[int, str, list[dict[str, Any]]], str]


def driver(script: Script, *, name: str = "driver") -> FunctionModel:
    """A root model that is a function: script(turn, request, messages) -> the reply text.

    `turn` counts from 1 within one agent run; `request` is the call's prompt as the agent
    announced it. The reply carries its code in a ```python block, as a model's would.
    """

    def complete(messages: list[dict[str, Any]]) -> str:
        turn = 1 + sum(1 for m in messages if m.get("role") == "assistant")
        return script(turn, request_of(messages), messages)

    return FunctionModel(complete, name=name)


def request_of(messages: list[dict[str, Any]]) -> str:
    """The request line of an agent's first user message (agents/rlm.py writes it)."""
    for m in messages:
        if m.get("role") == "user":
            found = re.search(r"^Request: (.*)$", str(m.get("content", "")), re.M)
            if found:
                return found.group(1)
    return ""


def system_of(messages: list[dict[str, Any]]) -> str:
    return next((str(m["content"]) for m in messages if m.get("role") == "system"), "")


def code(text: str, say: str = "") -> str:
    """A model-shaped reply: a sentence, then the code in a python fence."""
    return f"{say}\n```python\n{text.strip()}\n```".lstrip()


def stand_in_reader(messages: list[dict[str, Any]], context: Any = None) -> str:
    """A reader with no model, for tests and quick offline runs: a figure in ms, else a
    number of four or more digits, from its context; else the context's first words."""
    text = (
        context
        if isinstance(context, str)
        else " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    )
    found = re.search(r"\b(\d+) ms\b", text) or re.search(r"\b(\d{4,})\b", text)
    if found:
        return found.group(1)
    return " ".join(text.split()[:20])


def offline_models(script: Script, *, scripted_reader: bool) -> dict[str, Any]:
    """The models of `council run EXAMPLE --models EXAMPLE:drivers` (the scripted root;
    the reader, `local/smollm2`, left to SmolLM2) or `...:scripted` (no model at all)."""
    models: dict[str, Any] = {DRIVER: driver(script)}
    if scripted_reader:
        models[LOCAL] = FunctionModel(stand_in_reader, name="stand-in-reader")
    return models


@dataclass
class Models:
    """What one run uses: the (possibly re-modelled) council and the model objects."""

    council: Council
    models: dict[str, Any]
    label: str
    server: Any = None  # the LocalModelServer, when one runs

    @property
    def api_base(self) -> str | None:
        return self.server.api_base if self.server is not None else None


@asynccontextmanager
async def models_for(
    args: argparse.Namespace, council: Council, script: Script | None
) -> AsyncIterator[Models]:
    """The models for `args`: a real one, SmolLM2 plus a driver, or none (replay)."""
    how = mode(args)
    drive = {DRIVER: driver(script)} if script is not None else {}
    if how == "replay":
        yield Models(
            council,
            drive,
            f"replaying {args.replay}: model and human answers come from the recording; "
            "agents and their REPL code run for real",
        )
        return
    if how == "model":
        yield Models(
            council.with_model(args.model),
            {},
            f"every agent and LLM peer runs on {args.model}",
        )
        return
    from agents.local import LocalModelMissing, LocalModelServer

    try:
        server = LocalModelServer(n_ctx=4096)
        await server.astart(timeout=180)
    except LocalModelMissing as e:
        raise ExampleError(
            f"{e}; or run on a hosted model with --model MODEL, or replay a recording with "
            f"--replay {CASSETTES}/<example>.jsonl"
        ) from None
    try:
        yield Models(
            council,
            {**drive, LOCAL: server.model()},
            "offline: SmolLM2-135M (llama-cpp-python, loopback) is the sub-LLM; the agents' "
            "root model is a scripted driver, because a 135M model cannot write useful code",
            server,
        )
    finally:
        server.cleanup()


def session_options(args: argparse.Namespace) -> dict[str, Any]:
    """Recording and replay, for Session(...)."""
    out: dict[str, Any] = {}
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        out["record"] = args.record
    if args.replay:
        if not Path(args.replay).is_file():
            raise ExampleError(
                f"--replay {args.replay}: no such cassette; record one with --record"
            )
        out["replay"] = args.replay
        out["strict"] = bool(getattr(args, "strict", False))
    return out


def humans_for(args: argparse.Namespace, council: Council, answers: dict[str, list[str]]):
    """Endpoints for the council's humans: this terminal when it is one, else scripted
    answers; none in a replay (the recording answers for them)."""
    if mode(args) == "replay":
        return {}
    from agents.human import ScriptedHuman, TerminalHuman

    out: dict[str, Any] = {}
    for p in council.peers:
        if not isinstance(p, Human):
            continue
        if sys.stdin.isatty() and not getattr(args, "scripted_human", False):
            out[p.name] = TerminalHuman(p.name, stdout=sys.stderr)
        else:
            out[p.name] = ScriptedHuman(p.name, list(answers.get(p.name, [])))
    return out


# -- what the root model is shown -----------------------------------------------------------


@dataclass
class PromptLog:
    """Sizes of every prompt sent to the model peers named, as the bus carried them.

    It reads the calls to `<agent>-model` off the bus (a plain subscriber beside the
    peer's queue group), so it sees exactly what the root model was sent, live or in a
    replay, and takes no part in the session.
    """

    peers: list[str]
    out: Any = None
    sizes: list[tuple[str, int, int]] = field(default_factory=list)  # (peer, turn, chars)
    _turns: dict[str, int] = field(default_factory=dict)

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        subs = []

        async def on_call(msg: Msg) -> None:
            try:
                call = decode(msg.data)
            except MalformedMessage:
                return
            if isinstance(call, Call):
                self._seen(call)

        for peer in self.peers:
            subs.append(
                await bus.nc.subscribe(subjects.call(bus.session, peer, subjects.ANY), cb=on_call)
            )
        await settle(bus.nc)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            await unsubscribe(subs)

    def _seen(self, call: Call) -> None:
        messages = call.args.get("messages") or []
        chars = len(call.prompt) + sum(len(str(m.get("content", ""))) for m in messages)
        key = f"{call.callee}:{call.parent}"
        turn = self._turns[key] = self._turns.get(key, 0) + 1
        self.sizes.append((call.callee, turn, chars))
        if self.out is not None:
            agent = call.callee.removesuffix("-model")
            print(
                f"  [{agent}] turn {turn}: the root prompt is {chars:,} characters "
                f"(~{estimate_tokens('x' * chars):,} tokens)",
                file=self.out,
                flush=True,
            )

    @property
    def largest(self) -> int:
        return max((c for _, _, c in self.sizes), default=0)


# -- printing -------------------------------------------------------------------------------


def say(args: argparse.Namespace, *text: Any) -> None:
    if not args.quiet:
        print(*text, flush=True)


def usage_line(result: Any) -> str:
    u = result.usage
    cost = "unknown" if u.cost is None else f"${u.cost:.4f}"
    return (
        f"{u.model_calls} model calls, {u.tokens:,} tokens, cost {cost}, "
        f"{u.wall_time:.1f} s of agent time"
    )


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __str__(self) -> str:
        return f"{time.monotonic() - self.t0:.1f} s"


def guarded(main: Callable[[], int]) -> int:
    """Run an example's main: a framework error is one message (it says what to do), not a
    traceback; Ctrl-C is exit 130."""
    try:
        return main()
    except CouncilError as e:
        print(f"{Path(sys.argv[0]).name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        return 130
