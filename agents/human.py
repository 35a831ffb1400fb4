"""A person on the bus: agents call `human("question", context=...)` and wait for the answer.

Questions wait durably, so a person who connects late or reconnects still sees them:
each human has one JetStream KV bucket per session (`council-human-<session>-<human>`,
created and deleted by the runner) holding

    q.<question id>   the question (who asks, the prompt, a preview of the context)
    a.<question id>   its answer, written with create-if-absent: answered once only
    f.<id>            a final answer the session sends back to this person

Two sides: `HumanPeer` serves the human's name (writes the question, waits for the
answer); endpoints (`HumanDesk` and, on it, `ScriptedHuman` for tests and
`TerminalHuman` for `council human`) list pending questions and submit answers.
Neither side needs the other to be up: the bucket is the meeting point.

Who may touch the bucket is the server's business (channels/permissions.py): the human's
peer writes questions and reads answers, its endpoint (`<human>-desk`) reads questions and
writes answers, nobody else anything. So a peer learns only the answers to the questions it
asked (as the replies of its calls), and only the person answers. Both sides use the
bucket through plain subjects (JetStream publishes, direct gets, and core subscriptions to
hear new entries), never the JetStream API that manages streams or consumers. An entry
that does not parse is skipped with a warning: one bad entry never ends a session.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TextIO, TypeVar

import anyio
import anyio.to_thread
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.terminal import read_line
from channels import log, subjects
from channels.bus import Bus
from channels.errors import CouncilError
from channels.messages import Call, Ref, Value
from channels.natsio import unsubscribe
from channels.permissions import human_bucket

_log = log.get("council.human")

SIGNATURE = "(question: str, context=None) -> str"
PREVIEW = 300
QUIET = 2.0
"""Seconds without news after which a side reads the bucket again (a core subscription
may miss what was written while the connection was away)."""
_WRONG_LAST_SEQUENCE = (10071, 10164)
M = TypeVar("M", bound=BaseModel)


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


def bucket_name(session: str, human: str) -> str:
    return human_bucket(session, human)


class NoBucket(CouncilError):
    """The human's bucket does not exist: the runner creates it when the session starts."""


class Entry(BaseModel):
    """One key's latest message in a bucket (`deleted` for a withdrawn one)."""

    key: str
    data: bytes
    deleted: bool = False


class Bucket:
    """One human's bucket, used through data-plane subjects only (see the module doc)."""

    def __init__(self, bus: Bus, human: str) -> None:
        self.nc = bus.nc
        self.name = bucket_name(bus.session, human)
        self.stream = f"KV_{self.name}"
        self.pre = f"$KV.{self.name}."
        self.js = bus.nc.jetstream()

    def subject(self, key: str) -> str:
        return self.pre + key

    async def _publish(self, key: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            await self.js.publish(self.subject(key), data, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoBucket(
                f"no bucket {self.name!r} holds {key!r}: the runner creates it when the "
                "session starts (start `council run` first, or check the session id)"
            ) from None

    async def put(self, key: str, data: bytes) -> None:
        await self._publish(key, data)

    async def create(self, key: str, data: bytes) -> bool:
        """Write `key` unless it holds a value already; False if it did."""
        try:
            await self._publish(key, data, {"Nats-Expected-Last-Subject-Sequence": "0"})
        except nats.js.errors.APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def delete(self, key: str) -> None:
        await self._publish(key, b"", {"KV-Operation": "DEL"})

    async def get(self, key: str) -> Entry | None:
        """`key`'s latest entry (a direct get by subject), None if it has none."""
        msg = await self.nc.request(
            f"$JS.API.DIRECT.GET.{self.stream}.{self.subject(key)}", b"", timeout=5
        )
        return self._entry(msg)

    async def scan(self, pattern: str) -> list[Entry]:
        """Every key under `pattern` ("q.*"), one direct get each, in stream order."""
        out: list[Entry] = []
        seq = 1
        while True:
            body = json.dumps({"seq": seq, "next_by_subj": self.subject(pattern)}).encode()
            msg = await self.nc.request(f"$JS.API.DIRECT.GET.{self.stream}", body, timeout=5)
            entry = self._entry(msg)
            if entry is None:
                return out
            out.append(entry)
            seq = int((msg.headers or {}).get("Nats-Sequence", seq)) + 1

    def _entry(self, msg: Msg) -> Entry | None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status:
            raise NoBucket(
                f"bucket {self.name!r} answered a read with status {status} "
                f"({headers.get('Description', '')}); the runner creates it at session start"
            )
        subject = headers.get("Nats-Subject", "")
        return Entry(
            key=subject.removeprefix(self.pre),
            data=msg.data,
            deleted=headers.get("KV-Operation") in ("DEL", "PURGE"),
        )

    @asynccontextmanager
    async def listen(self, pattern: str) -> AsyncIterator[anyio.abc.ObjectReceiveStream[Entry]]:
        """Entries written under `pattern` from now on, as they are written."""
        send, receive = anyio.create_memory_object_stream[Entry](max_buffer_size=1024)

        async def on_msg(msg: Msg) -> None:
            headers = msg.headers or {}
            entry = Entry(
                key=msg.subject.removeprefix(self.pre),
                data=msg.data,
                deleted=headers.get("KV-Operation") in ("DEL", "PURGE"),
            )
            try:
                send.send_nowait(entry)
            except anyio.WouldBlock:  # the next quiet spell's scan will find it
                pass

        sub = await self.nc.subscribe(self.subject(pattern), cb=on_msg)
        try:
            yield receive
        finally:
            with anyio.CancelScope(shield=True):
                await unsubscribe([sub])
                send.close()


async def provision(bus: Bus, humans: Iterable[str], *, replicas: int = 1) -> None:
    """Create the humans' buckets of the session (the runner does, as admin)."""
    js = bus.nc.jetstream()
    for human in humans:
        try:
            await js.create_key_value(
                bucket=bucket_name(bus.session, human), history=1, direct=True, replicas=replicas
            )
        except nats.js.errors.BadRequestError as e:
            if e.err_code != 10058:  # already there (made by an earlier runner): keep it
                raise


async def delete_buckets(bus: Bus, humans: Iterable[str]) -> None:
    """Session data is not kept: called by the runner when the session ends."""
    js = bus.nc.jetstream()
    for human in humans:
        try:
            await js.delete_key_value(bucket_name(bus.session, human))
        except nats.js.errors.NotFoundError:
            pass


def preview(value: Any, limit: int = PREVIEW) -> str:
    if value is None:
        return ""
    if isinstance(value, Ref):
        return f"{value.kind}, {value.size:,} bytes: {value.preview}"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse(model: type[M], entry: Entry, bucket: str) -> M | None:
    """The entry as `model`, or None (with a warning) for one that does not parse."""
    try:
        return model.model_validate_json(entry.data)
    except ValidationError as e:
        _log.warning(
            "human.entry_skipped",
            bucket=bucket,
            key=entry.key,
            error=str(e.errors()[0]["msg"]) if e.errors() else str(e),
            hint="an entry written by something other than council; delete it if it stays",
        )
        return None


# -- the peer side ----------------------------------------------------------------------------


class HumanPeer:
    """Serves `name`: each call becomes a durable question; the reply is its answer text."""

    signature = SIGNATURE

    def __init__(self, name: str, *, description: str = "", concurrency: int = 64) -> None:
        self.name = subjects.check_name(name, "human name")
        self.description = description or "a person; ask only what you cannot work out"
        self.concurrency = concurrency
        self._bucket: Bucket | None = None

    def attach(self, bus: Bus) -> None:
        """Use `bus` for the bucket (what `run` does before serving)."""
        self._bucket = Bucket(bus, self.name)

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        self.attach(bus)
        await bus.serve(self.name, self.ask, concurrency=self.concurrency, task_status=task_status)

    async def ask(self, call: Call) -> str:
        assert self._bucket is not None, "run(bus) first"
        bucket = self._bucket
        question = Question(
            id=call.id,
            human=self.name,
            asker=call.caller,
            prompt=call.prompt,
            context_preview=preview(call.context),
            context=call.context,
        )
        qkey, akey = f"q.{call.id}", f"a.{call.id}"
        answered = False
        try:
            async with bucket.listen(akey) as news:
                # listening before asking: an answer cannot slip in between
                await bucket.create(qkey, question.model_dump_json(by_alias=True).encode())
                _log.info("question.asked", human=self.name, asker=call.caller, id=call.id)
                entry: Entry | None = None
                while True:
                    if entry is not None and not entry.deleted and entry.data:
                        answer = _parse(Answer, entry, bucket.name)
                        if answer is not None:
                            answered = True
                            return answer.text
                    entry = None
                    with anyio.move_on_after(QUIET):
                        entry = await news.receive()
                    if entry is None:  # quiet: a notice may have been missed, look
                        entry = await _get(bucket, akey)
        finally:
            if not answered:  # withdrawn (cancelled or timed out): no endpoint should show it
                with anyio.CancelScope(shield=True):
                    try:
                        await bucket.delete(qkey)
                    except Exception as e:
                        _log.debug("question.not_withdrawn", id=call.id, error=str(e))


async def _get(bucket: Bucket, key: str) -> Entry | None:
    try:
        return await bucket.get(key)
    except (nats.errors.Error, NoBucket) as e:  # reconnecting: try again on the next quiet spell
        _log.debug("kv.get_failed", key=key, error=str(e))
        return None


# -- the endpoint side ------------------------------------------------------------------------


class HumanDesk:
    """Where a person (or a script) meets the questions for `human`: list, wait, answer."""

    def __init__(self, bus: Bus, human: str, *, by: str = "") -> None:
        self.bus = bus
        self.human = subjects.check_name(human, "human name")
        self.by = by or bus.name
        self.bucket = Bucket(bus, self.human)

    async def _answered(self) -> set[str]:
        return {e.key[2:] for e in await self.bucket.scan("a.*") if not e.deleted}

    async def pending(self) -> list[Question]:
        """Questions asked and not yet answered (nor withdrawn), oldest first."""
        answered = await self._answered()
        found = [
            q
            for e in await self.bucket.scan("q.*")
            if not e.deleted and e.key[2:] not in answered
            if (q := _parse(Question, e, self.bucket.name)) is not None
        ]
        return sorted(found, key=lambda q: q.asked_at)

    async def questions(self) -> AsyncIterator[Question]:
        """Every pending question, now and as they are asked, each once; runs until cancelled.

        New questions arrive on a subscription; when it is quiet the pending list is read
        again, since a person must not miss one written while the connection was away.
        """
        seen: set[str] = set()
        async with self.bucket.listen("q.*") as news:
            while True:
                try:
                    found = await self.pending()
                except Exception as e:  # the server is away; keep waiting
                    _log.debug("questions.not_listed", error=str(e))
                    found = []
                for q in found:
                    if q.id not in seen:
                        seen.add(q.id)
                        yield q
                with anyio.move_on_after(QUIET):
                    await news.receive()  # something new: list again at once

    async def answer(self, question: Question | str, text: str) -> None:
        """Answer once; a second answer (from here or any endpoint) raises AlreadyAnswered."""
        qid = question if isinstance(question, str) else question.id
        answer = Answer(id=qid, text=str(text), by=self.by)
        if not await self.bucket.create(f"a.{qid}", answer.model_dump_json().encode()):
            raise AlreadyAnswered(
                f"question {qid} to {self.human!r} was already answered; see pending() for open ones"
            )

    async def finals(self) -> AsyncIterator[Final]:
        """Final answers sent to this person, past and future; runs until cancelled."""
        seen: set[str] = set()
        async with self.bucket.listen("f.*") as news:
            while True:
                try:
                    entries = await self.bucket.scan("f.*")
                except Exception as e:
                    _log.debug("finals.not_listed", error=str(e))
                    entries = []
                for e in entries:
                    if e.key in seen or e.deleted:
                        continue
                    seen.add(e.key)
                    final = _parse(Final, e, self.bucket.name)
                    if final is not None:
                        yield final
                with anyio.move_on_after(QUIET):
                    await news.receive()


async def send_final(bus: Bus, human: str, final: Final) -> None:
    """Give a council's final answer to `human` (it waits in the bucket like a question)."""
    await Bucket(bus, human).put(f"f.{final.id}", final.model_dump_json(by_alias=True).encode())


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
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._show_finals, desk)
            self._print(f"[{self.human}] waiting for questions (Ctrl-C to leave)")
            task_status.started()
            async for q in desk.questions():
                self._print("", f"[{self.human}] question from {q.asker}: {q.prompt}")
                if q.context_preview:
                    self._print(f"  context: {q.context_preview}")
                # on a terminal, without blocking the loop: Ctrl-C here stops at once
                text = await read_line("  your answer> ", stdin=self.stdin, stdout=self.stdout)
                if text is None:  # stdin closed: nobody left to answer
                    self._print("", f"[{self.human}] stdin closed; leaving")
                    tg.cancel_scope.cancel()
                    return
                try:
                    await desk.answer(q, text)
                except AlreadyAnswered:
                    self._print("  (already answered elsewhere)")

    async def _show_finals(self, desk: HumanDesk) -> None:
        async for final in desk.finals():
            self._print("", f"[{self.human}] final answer: {preview(final.value, 2000)}")
