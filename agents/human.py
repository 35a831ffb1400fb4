"""A person on the bus: agents call `human("question", context=...)` and wait for the answer.

Questions wait durably, so a person who connects late or reconnects still sees them:
each session has one JetStream KV bucket (`council-human-<session>`) holding

    q.<human>.<question id>   the question (who asks, the prompt, a preview of the context)
    a.<human>.<question id>   its answer, written with create-if-absent: answered once only
    f.<human>.<id>            a final answer the session sends back to this person

Two sides: `HumanPeer` serves the human's name (writes the question, waits for the
answer); endpoints (`HumanDesk` and, on it, `ScriptedHuman` for tests and
`TerminalHuman` for `council human`) list pending questions and submit answers.
Neither side needs the other to be up: the bucket is the meeting point.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TextIO

import anyio
import anyio.to_thread
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from channels import log, subjects
from channels.bus import Bus
from channels.errors import CouncilError
from channels.messages import Call, Ref, Value

_log = log.get("council.human")

SIGNATURE = "(question: str, context=None) -> str"
PREVIEW = 300


class AlreadyAnswered(CouncilError):
    """Someone else (another endpoint) answered this question first."""


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    human: str
    asker: str
    prompt: str
    context_preview: str = ""
    context: Value = None
    asked_at: float = Field(default_factory=time.time)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    text: str
    by: str = ""
    answered_at: float = Field(default_factory=time.time)


class Final(BaseModel):
    """A council's final answer, shown to the person who is attached to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: str = ""
    value: Value = None
    at: float = Field(default_factory=time.time)


def bucket_name(session: str) -> str:
    return f"council-human-{subjects.check_name(session, 'session')}"


async def open_bucket(bus: Bus) -> KeyValue:
    """The session's human bucket, created if absent (by whichever side comes first)."""
    js = bus.nc.jetstream()
    name = bucket_name(bus.session)
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(bucket=name, history=1)
    except nats.js.errors.Error:  # created meanwhile by the other side
        return await js.key_value(name)


async def delete_bucket(bus: Bus) -> None:
    """Session data is not kept: called by the runner when the session ends."""
    try:
        await bus.nc.jetstream().delete_key_value(bucket_name(bus.session))
    except nats.js.errors.NotFoundError:
        pass


def preview(value: Any, limit: int = PREVIEW) -> str:
    if value is None:
        return ""
    if isinstance(value, Ref):
        return f"{value.kind}, {value.size:,} bytes: {value.preview}"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(kind: str, human: str, qid: str) -> str:
    return f"{kind}.{human}.{qid}"


@asynccontextmanager
async def _watch(kv: KeyValue, pattern: str) -> AsyncIterator[KeyValue.KeyWatcher]:
    """Yields current entries under `pattern`, then None, then new ones as they come."""
    watcher = await kv.watch(pattern)
    try:
        yield watcher
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await watcher.stop()
            except Exception:
                pass


_QUIET = object()


async def _next(watcher: KeyValue.KeyWatcher, quiet: float = 2.0) -> object:
    """The watch's next entry (or None marker), or _QUIET after `quiet` seconds of nothing."""
    try:
        return await watcher.updates(timeout=quiet)
    except nats.errors.TimeoutError:
        return _QUIET


async def _get(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    try:
        return await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    except Exception as e:  # reconnecting: try again on the next quiet spell
        _log.debug("kv.get_failed", key=key, error=str(e))
        return None


# -- the peer side ----------------------------------------------------------------------------


class HumanPeer:
    """Serves `name`: each call becomes a durable question; the reply is its answer text."""

    signature = SIGNATURE

    def __init__(self, name: str, *, description: str = "", concurrency: int = 64) -> None:
        self.name = subjects.check_name(name, "human name")
        self.description = description or "a person; ask only what you cannot work out"
        self.concurrency = concurrency
        self._kv: KeyValue | None = None

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        self._kv = await open_bucket(bus)
        await bus.serve(self.name, self.ask, concurrency=self.concurrency, task_status=task_status)

    async def ask(self, call: Call) -> str:
        assert self._kv is not None, "run(bus) first"
        kv = self._kv
        question = Question(
            id=call.id,
            human=self.name,
            asker=call.caller,
            prompt=call.prompt,
            context_preview=preview(call.context),
            context=call.context,
        )
        qkey = _key("q", self.name, call.id)
        try:
            await kv.create(qkey, question.model_dump_json(by_alias=True).encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # the same call asked again (a redelivery): keep the first
        _log.info("question.asked", human=self.name, asker=call.caller, id=call.id)
        answered = False
        try:
            akey = _key("a", self.name, call.id)
            async with _watch(kv, akey) as watcher:
                while True:
                    entry = await _next(watcher)
                    if entry is _QUIET:  # a watch does not survive every reconnect: look
                        entry = await _get(kv, akey)
                    if (
                        isinstance(entry, KeyValue.Entry)
                        and entry.value
                        and entry.operation is None
                    ):
                        answered = True
                        return Answer.model_validate_json(entry.value).text
        finally:
            if not answered:  # withdrawn (cancelled or timed out): no endpoint should show it
                with anyio.CancelScope(shield=True):
                    try:
                        await kv.delete(qkey)
                    except Exception as e:
                        _log.debug("question.not_withdrawn", id=call.id, error=str(e))


# -- the endpoint side ------------------------------------------------------------------------


class HumanDesk:
    """Where a person (or a script) meets the questions for `human`: list, wait, answer."""

    def __init__(self, bus: Bus, human: str, *, by: str = "") -> None:
        self.bus = bus
        self.human = subjects.check_name(human, "human name")
        self.by = by or bus.name
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self.bus)
        return self._kv

    async def _answered(self, qid: str) -> bool:
        try:
            await (await self.kv()).get(_key("a", self.human, qid))
            return True
        except nats.js.errors.KeyNotFoundError:
            return False

    async def pending(self) -> list[Question]:
        """Questions asked and not yet answered (nor withdrawn), oldest first."""
        found: list[Question] = []
        async with _watch(await self.kv(), _key("q", self.human, ">")) as watcher:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value and entry.operation is None:
                    q = Question.model_validate_json(entry.value)
                    if not await self._answered(q.id):
                        found.append(q)
        return sorted(found, key=lambda q: q.asked_at)

    async def questions(self) -> AsyncIterator[Question]:
        """Every pending question, now and as they are asked, each once; runs until cancelled.

        New questions arrive by a KV watch; when it is quiet the pending list is read again,
        since a watch may not survive a server restart and a person must not miss one.
        """
        seen: set[str] = set()
        async with _watch(await self.kv(), _key("q", self.human, ">")) as watcher:
            while True:
                entry = await _next(watcher)
                if entry is _QUIET:
                    try:
                        found = await self.pending()
                    except Exception as e:  # the server is away; keep waiting
                        _log.debug("questions.not_listed", error=str(e))
                        found = []
                elif isinstance(entry, KeyValue.Entry) and entry.value and entry.operation is None:
                    q = Question.model_validate_json(entry.value)
                    found = [] if q.id in seen or await self._answered(q.id) else [q]
                else:
                    continue
                for q in found:
                    if q.id not in seen:
                        seen.add(q.id)
                        yield q

    async def answer(self, question: Question | str, text: str) -> None:
        """Answer once; a second answer (from here or any endpoint) raises AlreadyAnswered."""
        qid = question if isinstance(question, str) else question.id
        answer = Answer(id=qid, text=str(text), by=self.by)
        try:
            await (await self.kv()).create(
                _key("a", self.human, qid), answer.model_dump_json().encode()
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            raise AlreadyAnswered(
                f"question {qid} to {self.human!r} was already answered; see pending() for open ones"
            ) from None

    async def finals(self) -> AsyncIterator[Final]:
        """Final answers sent to this person, past and future; runs until cancelled."""
        async with _watch(await self.kv(), _key("f", self.human, ">")) as watcher:
            async for entry in watcher:
                if entry is not None and entry.value and entry.operation is None:
                    yield Final.model_validate_json(entry.value)


async def send_final(bus: Bus, human: str, final: Final) -> None:
    """Give a council's final answer to `human` (it waits in the bucket like a question)."""
    kv = await open_bucket(bus)
    await kv.put(_key("f", human, final.id), final.model_dump_json(by_alias=True).encode())


Responder = Callable[[Question], str | Awaitable[str]]


class ScriptedHuman:
    """An endpoint for tests: answers from a list, in order, or from a function."""

    def __init__(self, human: str, answers: Iterable[str] | Responder) -> None:
        self.human = human
        self._fn: Responder | None = answers if callable(answers) else None
        self._answers = None if callable(answers) else list(answers)
        self.asked: list[Question] = []
        self.finals: list[Final] = []

    async def respond(self, q: Question) -> str:
        if self._fn is not None:
            out = self._fn(q)
            return await out if isinstance(out, Awaitable) else out
        assert self._answers is not None
        if not self._answers:
            raise CouncilError(
                f"scripted human {self.human!r} has no answer left for {q.prompt!r}; "
                "give it more answers"
            )
        return self._answers.pop(0)

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        desk = HumanDesk(bus, self.human, by="script")
        await desk.kv()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._collect_finals, desk)
            task_status.started()
            async for q in desk.questions():
                self.asked.append(q)
                try:
                    await desk.answer(q, await self.respond(q))
                except AlreadyAnswered:
                    pass

    async def _collect_finals(self, desk: HumanDesk) -> None:
        async for final in desk.finals():
            self.finals.append(final)


class TerminalHuman:
    """`council human`: prints each question (who asks, a context preview), reads the answer
    from stdin, and prints final answers as they arrive."""

    def __init__(
        self, human: str, *, stdin: TextIO | None = None, stdout: TextIO | None = None
    ) -> None:
        self.human = human
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout

    def _print(self, *lines: str) -> None:
        for line in lines:
            print(line, file=self.stdout, flush=True)

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        desk = HumanDesk(bus, self.human, by="terminal")
        await desk.kv()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._show_finals, desk)
            self._print(f"[{self.human}] waiting for questions (Ctrl-C to leave)")
            task_status.started()
            async for q in desk.questions():
                self._print("", f"[{self.human}] question from {q.asker}: {q.prompt}")
                if q.context_preview:
                    self._print(f"  context: {q.context_preview}")
                self.stdout.write("  your answer> ")
                self.stdout.flush()
                text = await anyio.to_thread.run_sync(self.stdin.readline, abandon_on_cancel=True)
                if not text:  # stdin closed: nobody left to answer
                    self._print("", f"[{self.human}] stdin closed; leaving")
                    tg.cancel_scope.cancel()
                    return
                try:
                    await desk.answer(q, text.rstrip("\n"))
                except AlreadyAnswered:
                    self._print("  (already answered elsewhere)")

    async def _show_finals(self, desk: HumanDesk) -> None:
        async for final in desk.finals():
            self._print("", f"[{self.human}] final answer: {preview(final.value, 2000)}")
