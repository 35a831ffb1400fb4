"""What a session is doing, as typed events for apps: `async for e in session.events()`.

    async with Session(council) as s:
        async with s.events() as events:          # listening from here on
            s.call_in(partial(s.ask, "Review this draft", context=draft))
            async for e in events:
                match e:
                    case CallStarted(): ...       # who called whom, with what
                    case ModelTokens(): ...       # a model answered: model, tokens, cost
                    case ReplOutput(): ...        # code an agent ran, and what it printed
                    case HumanQuestion(): ...     # a person is asked something
                    case Failed(): ...            # a call failed: its kind and message
                    case CallEnded() if e.call == e.root: break   # the request is answered

Built from what is on the bus already (calls, answers and the peers' events of
channels/messages.py), seen from one listening connection: nothing a peer does changes or
waits for it, and it sees the peers of every process in the session. Events of a kind this
module does not know (a newer peer's) arrive as `Other`, never as an error. The stream is
bounded: past `buffer` undelivered events the newest are dropped and counted (`dropped`),
so a slow consumer never slows the run.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Literal, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from channels import log, subjects
from channels.errors import MalformedMessage
from channels.messages import (
    Batch,
    Call,
    Completion,
    Execution,
    Failure,
    FailureKind,
    Reply,
    Step,
    Usage,
    decode,
)
from channels.natsio import drain, settle

_log = log.get("council.events")

PREVIEW = 200  # characters of a prompt, value or output an event carries
BUFFER = 10_000  # undelivered events held per stream
ROOTS_KEPT = 100_000  # calls whose request is remembered for the events that follow them
_ANSWERS = (b'{"type":"reply"', b'{"type":"failure"')

PeerKind: TypeAlias = Literal[
    "agent", "llm", "human", "function", "mcp", "model", "repl", "runner", "other"
]


class _AppEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    session: str
    ts: float = Field(description="when this process saw it (unix time)")
    call: str | None = Field(default=None, description="the call this event belongs to")
    root: str | None = Field(default=None, description="the request (top call) it is part of")


class CallStarted(_AppEvent):
    """A peer called another: `caller` -> `callee`."""

    type: Literal["call_started"] = "call_started"
    parent: str | None = None
    caller: str
    callee: str
    callee_kind: PeerKind = "other"
    prompt: str = ""
    op: str | None = Field(default=None, description="an agent's REPL call: 'exec', ...")
    depth: int = 0


class CallEnded(_AppEvent):
    """A call was answered."""

    type: Literal["call_ended"] = "call_ended"
    caller: str = ""
    callee: str = ""
    value: str = Field(default="", description="a preview of the answer")
    usage: Usage = Usage()
    seconds: float | None = Field(default=None, description="from start to answer, as seen")


class Failed(_AppEvent):
    """A call ended in a typed failure (channels/messages.py `FailureKind`)."""

    type: Literal["failed"] = "failed"
    caller: str = ""
    callee: str = ""
    kind: FailureKind
    message: str
    usage: Usage = Usage()
    seconds: float | None = None


class ModelTokens(_AppEvent):
    """A model completion: which model, the tokens it used and what it cost (None: unknown
    price)."""

    type: Literal["model_tokens"] = "model_tokens"
    peer: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = 0.0
    seconds: float = 0.0
    response: str = Field(default="", description="a preview of what the model said")


class ReplOutput(_AppEvent):
    """Code an agent ran in its REPL, and what it printed (clipped)."""

    type: Literal["repl_output"] = "repl_output"
    peer: str
    code: str
    status: str
    output: str = ""


class HumanQuestion(_AppEvent):
    """A person is asked something (a call to a human peer)."""

    type: Literal["human_question"] = "human_question"
    human: str
    caller: str
    question: str


class AgentStep(_AppEvent):
    """An agent's turn began or ended."""

    type: Literal["agent_step"] = "agent_step"
    peer: str
    n: int
    phase: str
    detail: str = ""


class Other(_AppEvent):
    """An event this version does not model (a log line, a newer peer's event type)."""

    type: Literal["other"] = "other"
    kind: str = Field(description="the bus message's own type")
    peer: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


Event: TypeAlias = Annotated[
    CallStarted | CallEnded | Failed | ModelTokens | ReplOutput | HumanQuestion | AgentStep | Other,
    Field(discriminator="type"),
]
EVENT = TypeAdapter(Event)
"""Validates an event from JSON (`EVENT.validate_json(line)`), for an app across a socket."""


def _clip(text: Any, n: int = PREVIEW) -> str:
    if not isinstance(text, str):
        text = json.dumps(text, default=str, ensure_ascii=False)
    return text if len(text) <= n else text[: n - 1] + "…"


def kinds_of(council: Any) -> dict[str, PeerKind]:
    """Every name that can be called in `council` -> what kind of peer answers it."""
    out: dict[str, PeerKind] = {"admin": "runner"}
    for p in getattr(council, "peers", []):
        out[p.name] = p.kind
        if p.kind == "agent":
            out[p.model_peer] = "model"
            out[p.repl_peer] = "repl"
            out[p.child_peer] = "agent"
    return out


class Translator:
    """Bus messages -> app events. Pure apart from its memory of the calls still open, so
    a test can feed it messages directly."""

    def __init__(self, session: str, kinds: dict[str, PeerKind] | None = None) -> None:
        self.session = session
        self.kinds = kinds or {}
        self.open: dict[str, CallStarted] = {}
        self.roots: dict[str, str] = {}  # call -> root, kept a while after it ends

    def kind(self, name: str) -> PeerKind:
        if name in self.kinds:
            return self.kinds[name]
        base, _, n = name.rpartition("-")  # an agent's extra REPL workers: chair-repl-2
        if n.isdigit() and self.kinds.get(base) == "repl":
            return "repl"
        return "other"

    def translate(self, data: bytes, at: float | None = None) -> list[_AppEvent]:
        at = time.time() if at is None else at
        try:
            msg = decode(data)
        except MalformedMessage:
            return self._unknown(data, at)
        if isinstance(msg, Call):
            return self._call(msg, at)
        if isinstance(msg, Batch):
            return [e for item in msg.calls for e in self._call(item.call, at)]
        if isinstance(msg, Reply | Failure):
            return self._answer(msg, at)
        base = {"session": self.session, "ts": at, "call": getattr(msg, "call", None)}
        base["root"] = self.roots.get(base["call"] or "")
        if isinstance(msg, Completion):
            u = msg.usage
            return [
                ModelTokens(
                    **base,
                    peer=msg.peer,
                    model=msg.model,
                    input_tokens=u.input_tokens,
                    output_tokens=u.output_tokens,
                    cost=u.cost,
                    seconds=u.wall_time,
                    response=_clip(msg.response),
                )
            ]
        if isinstance(msg, Execution):
            return [
                ReplOutput(
                    **base, peer=msg.peer, code=msg.code, status=msg.status, output=msg.output
                )
            ]
        if isinstance(msg, Step):
            return [AgentStep(**base, peer=msg.peer, n=msg.n, phase=msg.phase, detail=msg.detail)]
        if msg.type == "cancel":
            return []  # the callee's `cancelled` failure follows
        data_ = msg.model_dump(mode="json", by_alias=True)
        return [Other(**base, kind=msg.type, peer=data_.get("peer", ""), data=data_)]

    def _call(self, call: Call, at: float) -> list[_AppEvent]:
        started = CallStarted(
            session=self.session,
            ts=at,
            call=call.id,
            root=call.root or call.id,
            parent=call.parent,
            caller=call.caller,
            callee=call.callee,
            callee_kind=self.kind(call.callee),
            prompt=_clip(call.prompt),
            op=call.args.get("op") if isinstance(call.args.get("op"), str) else None,
            depth=call.depth,
        )
        self.open[call.id] = started
        self.roots[call.id] = started.root or call.id
        if len(self.roots) > ROOTS_KEPT:
            for old in list(self.roots)[: ROOTS_KEPT // 2]:
                del self.roots[old]
        out: list[_AppEvent] = [started]
        if started.callee_kind == "human":
            out.append(
                HumanQuestion(
                    session=self.session,
                    ts=at,
                    call=call.id,
                    root=started.root,
                    human=call.callee,
                    caller=call.caller,
                    question=call.prompt,
                )
            )
        return out

    def _answer(self, answer: Reply | Failure, at: float) -> list[_AppEvent]:
        started = self.open.pop(answer.id, None)
        base: dict[str, Any] = {"session": self.session, "ts": at, "call": answer.id or None}
        if started is not None:
            base |= {
                "root": started.root,
                "caller": started.caller,
                "callee": started.callee,
                "seconds": max(at - started.ts, 0.0),
            }
        if isinstance(answer, Reply):
            return [CallEnded(**base, value=_clip(answer.value), usage=answer.usage)]
        return [Failed(**base, kind=answer.kind, message=answer.message, usage=answer.usage)]

    def _unknown(self, data: bytes, at: float) -> list[_AppEvent]:
        """A message this version cannot read: an event type it does not know becomes
        `Other`; anything else is not for apps."""
        try:
            raw = json.loads(data)
        except ValueError:
            return []
        if not isinstance(raw, dict) or "peer" not in raw or not isinstance(raw.get("type"), str):
            return []
        return [
            Other(
                session=self.session,
                ts=at,
                call=raw.get("call") if isinstance(raw.get("call"), str) else None,
                kind=raw["type"],
                peer=str(raw.get("peer", "")),
                data=raw,
            )
        ]


class EventStream:
    """The typed events of one session, from when it starts listening.

    `async with session.events() as events:` listens before the block's body runs (so
    nothing the body starts is missed); `async for e in session.events()` listens from the
    first iteration. The stream ends when the session does, or at `aclose()`.
    """

    def __init__(self, session: Any, *, buffer: int = BUFFER) -> None:
        self._session = session
        self._buffer = buffer
        self._send: MemoryObjectSendStream[_AppEvent] | None = None
        self._receive: MemoryObjectReceiveStream[_AppEvent] | None = None
        self._subs: list[Any] = []
        self._closing = self._closed = False
        self.dropped = 0

    async def start(self) -> EventStream:
        if self._receive is not None:
            return self
        session = self._session
        if session.client is None or session._stack is None:
            raise RuntimeError("the session is not running; use `async with Session(...)`")
        self._send, self._receive = anyio.create_memory_object_stream[_AppEvent](self._buffer)
        bus = await session.connect("events")
        translator = Translator(session.session, kinds_of(session.council))

        async def on_message(msg: Msg) -> None:
            if msg.subject.startswith("_INBOX.") and not msg.data.startswith(_ANSWERS):
                return  # inboxes also carry JetStream answers and store chunks
            for event in translator.translate(msg.data):
                self._put(event)

        limits = {"pending_msgs_limit": 1_000_000, "pending_bytes_limit": 1 << 30}
        self._subs = [
            await bus.nc.subscribe(
                subjects.session_wildcard(session.session), cb=on_message, **limits
            ),
            await bus.nc.subscribe(f"_INBOX.{session.session}.>", cb=on_message, **limits),
        ]
        await settle(bus.nc)
        session._stack.push_async_callback(self.aclose)  # the session's end ends the stream
        return self

    def _put(self, event: _AppEvent) -> None:
        if self._send is None or self._closed:
            return
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or math.log2(self.dropped).is_integer():
                _log.warning("events.dropped", dropped=self.dropped, buffer=self._buffer)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        await drain(self._subs)  # what the server already routed here is still delivered
        self._closed = True
        if self._send is not None:
            await self._send.aclose()

    async def __aenter__(self) -> EventStream:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> _AppEvent:
        await self.start()
        assert self._receive is not None
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
