"""Everything that crosses a process boundary, as one validated union.

Both ends validate: a peer never acts on a message it could not parse, and a
sender never emits one its receiver would refuse. `v` lets a peer refuse a
message from a newer (or older) framework with a message that says so, instead
of a confusing shape error.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticSerializationError
from typing_extensions import TypeAliasType

from channels.errors import MalformedMessage

SCHEMA_VERSION = 1

FailureKind: TypeAlias = Literal[
    "timeout",
    "unavailable",
    "bad_request",
    "budget_exhausted",
    "depth_exceeded",
    "peer_error",
    "cancelled",
    "permission_denied",
]
FAILURE_KINDS: tuple[str, ...] = FailureKind.__args__  # type: ignore[attr-defined]

ValueKind: TypeAlias = Literal["text", "bytes", "json"]


def new_id() -> str:
    return uuid.uuid4().hex


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ref(_Model):
    """A handle on a value in the shared store.

    The JSON form has a `$ref` key so that a Ref nested anywhere in a JSON value
    is recognised as one; the repr is what a model sees, so it never shows more
    than the preview.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    digest: str = Field(alias="$ref", pattern=r"^sha256:[0-9a-f]{64}$")
    size: int = Field(ge=0)
    kind: ValueKind
    preview: str = Field(default="", max_length=400)
    scope: str = ""

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def __repr__(self) -> str:
        return (
            f"<Ref {self.kind} {_human_size(self.size)} {self.hex[:12]} preview={self.preview!r}>"
        )

    __str__ = __repr__


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# A JSON value in which a Ref may stand anywhere. Left-to-right so that a dict
# carrying `$ref` becomes a Ref and every other dict stays a dict; the scalars are strict
# so that True stays True (a lax int would take it) and 2.0 stays a float.
Value = TypeAliasType(
    "Value",
    Annotated[
        Ref
        | list["Value"]
        | dict[str, "Value"]
        | str
        | StrictBool
        | StrictInt
        | StrictFloat
        | None,
        Field(union_mode="left_to_right"),
    ],
)


class Usage(_Model):
    """What a call cost, for the whole subtree of calls it caused."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = 0.0
    model_calls: int = 0
    wall_time: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        cost = None if self.cost is None or other.cost is None else self.cost + other.cost
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost=cost,
            model_calls=self.model_calls + other.model_calls,
            wall_time=self.wall_time + other.wall_time,
        )


class Budget(_Model):
    """What a call may still spend; None means no limit on that axis."""

    tokens: int | None = None
    cost: float | None = None
    model_calls: int | None = None

    def after(self, spent: Usage) -> Budget:
        return Budget(
            tokens=None if self.tokens is None else self.tokens - spent.tokens,
            cost=None if self.cost is None or spent.cost is None else self.cost - spent.cost,
            model_calls=None if self.model_calls is None else self.model_calls - spent.model_calls,
        )

    @property
    def exhausted(self) -> bool:
        return any(x is not None and x <= 0 for x in (self.tokens, self.cost, self.model_calls))


class Call(_Model):
    type: Literal["call"] = "call"
    v: int = SCHEMA_VERSION
    id: str = Field(default_factory=new_id)
    session: str
    caller: str
    callee: str
    prompt: str = ""
    context: Value = None
    args: dict[str, Value] = Field(default_factory=dict)
    depth: int = Field(default=0, ge=0)
    deadline: float | None = None
    budget: Budget | None = None
    parent: str | None = None
    root: str | None = None
    heartbeat: float | None = Field(default=None, gt=0)
    """Seconds between the `Working` signals the caller wants while the callee holds the call;
    the caller's setting, so both ends agree on what silence means."""

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (wall clock, so it means the same in every process)."""
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)


BATCH_CALLS = 64
"""The most calls one `Batch` carries: a batch is cheap to split, and a callee that unpacks
it takes every item in before it answers any, so a bound keeps the first answers early."""


class Addressed(_Model):
    """One call of a `Batch` with the reply subject its answers go to (what a single call's
    NATS reply subject says), so each item is answered, heard and cancelled on its own."""

    reply: str
    call: Call


class Batch(_Model):
    """Calls from one caller to one callee in one message (a `.map` fan-out).

    It travels on the call subject those calls would each use, so rights and the caller's
    identity are the subject's as for a single call; the callee takes in every item as if it
    had arrived alone, and a listener (recorder, events, progress) sees the calls via
    `unbatched`. The NATS reply subject of the message is its first item's."""

    type: Literal["batch"] = "batch"
    v: int = SCHEMA_VERSION
    calls: list[Addressed] = Field(min_length=1, max_length=BATCH_CALLS)


class Reply(_Model):
    type: Literal["reply"] = "reply"
    v: int = SCHEMA_VERSION
    id: str = ""
    value: Value = None
    usage: Usage = Usage()
    spilled: bool = False  # value was moved to the store by the bus, not by the peer


class Failure(_Model):
    type: Literal["failure"] = "failure"
    v: int = SCHEMA_VERSION
    id: str = ""
    kind: FailureKind
    message: str
    partial: Value = None
    usage: Usage = Usage()


class Working(_Model):
    """A callee still holds call `id` (queued or running): sent to the call's reply subject
    once it has held it a moment without an answer, then every `Call.heartbeat` seconds.
    The caller takes silence as the callee's death: re-sends once, then fails `unavailable`."""

    type: Literal["working"] = "working"
    v: int = SCHEMA_VERSION
    id: str


class Cancel(_Model):
    """Sent by a caller that gave up, so the callee stops working for nobody."""

    type: Literal["cancel"] = "cancel"
    v: int = SCHEMA_VERSION
    id: str
    reason: str = "cancelled by caller"


class _Event(_Model):
    v: int = SCHEMA_VERSION
    session: str
    peer: str
    call: str | None = None
    ts: float = Field(default_factory=time.time)


class Step(_Event):
    """An agent turn began or ended."""

    type: Literal["step"] = "step"
    n: int
    phase: Literal["start", "end"] = "start"
    detail: str = ""


class Completion(_Event):
    """One model completion: what an LLM was asked and what it said."""

    type: Literal["completion"] = "completion"
    model: str
    messages: list[dict[str, Any]] = Field(default_factory=list)
    response: str = ""
    usage: Usage = Usage()


class Execution(_Event):
    """One run of code in a REPL worker."""

    type: Literal["execution"] = "execution"
    code: str
    status: Literal["ok", "error", "timeout", "crashed"]
    output: str = ""


class Log(_Event):
    type: Literal["log"] = "log"
    level: str = "info"
    event: str
    fields: dict[str, Value] = Field(default_factory=dict)


Event: TypeAlias = Step | Completion | Execution | Log
Message: TypeAlias = Annotated[
    Call | Batch | Reply | Failure | Working | Cancel | Step | Completion | Execution | Log,
    Field(discriminator="type"),
]

_message = TypeAdapter(Message)
_value = TypeAdapter(Value)


def encode(message: BaseModel) -> bytes:
    try:
        return message.model_dump_json(by_alias=True).encode()
    except PydanticSerializationError as e:
        raise MalformedMessage(f"cannot encode {type(message).__name__}: {e}") from e


def decode(data: bytes | str) -> Message:
    """Parse and validate one message; every way of failing is a `MalformedMessage`."""
    try:
        msg = _message.validate_json(data)
    except ValidationError as e:
        raise MalformedMessage(_explain(data, e)) from None
    if msg.v != SCHEMA_VERSION:
        raise MalformedMessage(
            f"unknown schema version {msg.v} (this peer speaks {SCHEMA_VERSION}); "
            "run the same rlm-council version on both ends"
        )
    return msg


def unbatched(msg: Message) -> list[Message]:
    """The calls a batch carries, or the message itself: what a listener on the bus handles
    one by one, so a batched fan-out reads exactly as the single calls it stands for."""
    if isinstance(msg, Batch):
        return [item.call for item in msg.calls]
    return [msg]


def _explain(data: bytes | str, e: ValidationError) -> str:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return f"not JSON ({len(data)} bytes, starting {bytes(data[:24]) if isinstance(data, bytes) else data[:24]!r})"
    if not isinstance(raw, dict):
        return f"expected a JSON object, got {type(raw).__name__}"
    if raw.get("v", SCHEMA_VERSION) != SCHEMA_VERSION:
        return (
            f"unknown schema version {raw.get('v')!r} (this peer speaks {SCHEMA_VERSION}); "
            "run the same rlm-council version on both ends"
        )
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<message>'}: {err['msg']}"
        for err in e.errors()[:5]
    )
    return f"wrong shape for a {raw.get('type', 'message')!r}: {problems}"


def validate_value(value: Any) -> Any:
    """Turn `$ref` dicts back into Refs, as a receiver of plain JSON needs."""
    return _value.validate_python(value)
