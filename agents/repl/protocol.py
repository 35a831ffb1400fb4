"""What crosses between an agent and its REPL worker: the worker's set-up and each run's result.

Kept free of heavy imports (no litellm, no store): the worker imports this at start-up,
and start-up time is paid again after every crash or timeout.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.repl.sandbox import Policy
from channels.messages import Failure, Usage, Value

Status = Literal["ok", "error", "timeout", "crashed"]

DEFAULT_MODEL_LIMIT = 20_000
"""Characters of one execution's output a model is shown by default."""


def clip(text: str, limit: int, *, what: str = "characters") -> str:
    """Keep the head and the tail of `text` and say how much of the middle was cut.

    Both ends matter to a model: the head shows what the code printed first, the tail
    shows how it ended (the last line of a traceback, a final count).
    """
    if limit <= 0:
        return f"[{len(text):,} {what} not shown]" if text else ""
    if len(text) <= limit:
        return text
    note = f"\n[... {{}} {what} cut from the middle of {len(text):,} ...]\n"
    room = max(0, limit - len(note.format(f"{len(text):,}")))
    head = room * 3 // 5
    tail = room - head
    cut = len(text) - head - tail
    return text[:head] + note.format(f"{cut:,}") + (text[len(text) - tail :] if tail else "")


class ExecResult(BaseModel):
    """One execution of code in the REPL, as the agent (and a recording) sees it.

    `stdout`/`stderr` hold everything the code printed up to the worker's output cap
    (`stdout_cut`/`stderr_cut` count what the cap dropped from the middle); what a model
    reads is `for_model()`, cut again to fit its prompt.
    """

    model_config = ConfigDict(extra="forbid")

    status: Status
    stdout: str = ""
    stderr: str = ""
    value: str | None = Field(default=None, description="repr of a trailing expression")
    error: str | None = Field(default=None, description="traceback, our own frames dropped")
    final_set: bool = False
    final: Value = None
    state_lost: bool = False
    duration: float = 0.0
    usage: Usage = Usage()
    stdout_cut: int = 0
    stderr_cut: int = 0
    notes: list[str] = Field(default_factory=list, description="plain-language notices")
    failure: Failure | None = Field(
        default=None, description="the failed call that ended the code, if it was not caught"
    )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def output(self) -> str:
        """The whole captured output (up to the worker's cap), for a recording or a human."""
        return self.for_model(limit=None)

    def for_model(self, limit: int | None = DEFAULT_MODEL_LIMIT) -> str:
        """What the model reads: output, value, error and notices, within `limit` characters.

        The error and the notices are cut last: a model that cannot see why its code failed,
        or that its variables are gone, will repeat the mistake.
        """
        notes = "\n".join(f"[{n}]" for n in self.notes)
        error = self.error or ""
        value = f"=> {self.value}" if self.value is not None else ""
        if self.final_set:
            shown = self.final if not isinstance(self.final, str) else repr(self.final)
            final = f"[FINAL answer set: {clip(str(shown), 500)}]"
        else:
            final = ""
        stderr = f"[stderr]\n{self.stderr}" if self.stderr else ""
        if limit is None:
            parts = [self.stdout, stderr, value, error, final, notes]
            return "\n".join(p.rstrip("\n") for p in parts if p) or "(no output)"
        # Fixed-size parts first, then the printed output gets whatever room is left.
        notes = clip(notes, max(200, limit // 4))
        final = clip(final, 600)
        error = clip(error, max(500, limit // 2))
        value = clip(value, max(200, limit // 4))
        used = sum(len(p) + 1 for p in (notes, final, error, value) if p)
        room = max(0, limit - used - 1)
        if self.stdout and stderr:
            out_room = room * 2 // 3 if len(stderr) > room // 3 else room - len(stderr)
            parts = [
                clip(self.stdout, out_room),
                clip(stderr, room - min(out_room, len(self.stdout))),
            ]
        else:
            parts = [clip(self.stdout or stderr, room)]
        parts += [value, error, final, notes]
        return "\n".join(p.rstrip("\n") for p in parts if p) or "(no output)"


class PeerInfo(BaseModel):
    """A peer as the worker exposes it: a function `name` in the namespace calling `target`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    target: str
    description: str = ""
    signature: str = "(prompt: str, context=None) -> str"
    concurrency: int = Field(default=64, ge=1)


class WorkerConfig(BaseModel):
    """Everything a worker needs, sent on its stdin (never argv or env: it holds credentials)."""

    model_config = ConfigDict(extra="forbid")

    url: str
    session: str
    name: str = Field(description="the peer name the worker serves, e.g. 'chair-repl'")
    agent: str
    user: str | None = None
    password: str | None = None
    peers: list[PeerInfo] = Field(default_factory=list)
    memory_mb: int | None = Field(default=None, ge=16)
    output_cap: int = Field(default=100_000, ge=1_000)
    value_cap: int = Field(default=10_000, ge=100)
    inline_limit: int | None = Field(
        default=None, description="bytes over which a value is stored and sent as a Ref"
    )
    parent_pid: int | None = None
    key: str = Field(
        default="",
        description="answer only calls whose args carry this `worker` key: two processes "
        "serving one agent may each start a worker under the same REPL name",
    )
    sandbox: Policy | None = Field(
        default=None, description="sandbox the worker with this policy before running code"
    )


# Operations the worker serves; the op travels in Call.args["op"], the code in Call.prompt.
Op = Literal["exec", "set_context", "stats", "ping"]


class WorkerStats(BaseModel):
    """Counters a test (or an operator) can ask a worker for."""

    model_config = ConfigDict(extra="forbid")

    executions: int = 0
    store_reads: dict[str, int] = Field(default_factory=dict, description="digest -> reads")
    store_writes: int = 0
    calls: int = 0
    in_flight_max: dict[str, int] = Field(default_factory=dict)
    pid: int = 0
    memory_limit: int | None = Field(default=None, description="RLIMIT_AS in bytes")
    sandbox: dict[str, str | int | bool] | None = Field(
        default=None, description="what the sandbox applied; None when it is off"
    )
