"""Request/reply between peers, with deadlines, cancellation, liveness and typed failures.

A `Bus` is one NATS connection acting for one named party (a peer, a worker, a
human endpoint) in one session. `call` sends a `Call` and returns the `Reply` or
raises the `CallFailed` subclass for the failure's kind; `serve` answers calls
for a peer name, many at once, until cancelled. `await bus.store()` is the session's
shared store on the same connection; a call or reply bigger than `spill_threshold` sends
its big values through it as `Ref`s (a spilled reply is read back for the caller).

Faults: a callee holding a call says so (`Working`) once it has held it a moment and then
every `heartbeat` seconds; a caller that hears nothing re-sends the call once (to the same
queue group, so another process serving the peer may take it) and fails it `unavailable`
when the re-send meets silence too. Every pending call is re-sent when the connection comes
back (a call published into a dying connection is otherwise lost). Re-sending is safe
because a callee de-duplicates on the call id: a call it holds gets the new reply subject
attached, a call it answered is answered again from a bounded cache, never run twice.

Batches: a fan-out's calls (`send(..., batched=True)`) to one callee that are sent in one loop
turn leave as one `Batch` message on the call subject they would each use, so a `.map` of
hundreds of calls costs a handful of messages and no wait. Only the trip out is shared: the
callee takes each item in as if it had come alone (refusals, de-duplication, its concurrency
limit, `Working`, cancel, one answer to the item's own reply subject), and the caller's
watch, re-sends and cancels stay per call (a re-send goes alone).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any

import anyio
import nats
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic_core import to_json

from channels import log, subjects
from channels.errors import (
    CallFailed,
    CallTimeout,
    MalformedMessage,
    PeerError,
    PermissionDenied,
    Unavailable,
    error_for,
)
from channels.messages import (
    BATCH_CALLS,
    Addressed,
    Batch,
    Call,
    Cancel,
    Event,
    Failure,
    Ref,
    Reply,
    Usage,
    Value,
    Working,
    decode,
    encode,
)
from channels.natsio import settle, unsubscribe
from channels.store import Store

_log = log.get("council.bus")

Handler = Callable[[Call], Awaitable[Any]]
"""Answers one call: returns a JSON value, a `Ref`, or a `Reply` (to report usage); raises
a `CallFailed` subclass to fail with that kind, anything else to fail with `peer_error`."""

DEFAULT_TIMEOUT = 600.0
DEFAULT_CONCURRENCY = 64
SPILL_THRESHOLD = 256 * 1024
"""A Call or Reply that would encode bigger than this sends its big values as store Refs:
well under the default max_payload (1 MiB), so a message never gets near the limit."""

BATCH_BYTES = 200 * 1024
"""Encoded bytes of calls one `Batch` carries at most (a call bigger than this goes alone):
with the spill threshold, a batch stays far under the default max_payload (1 MiB)."""
BATCH_ITEM_OVERHEAD = 32
"""Bytes a batch adds per call besides the call and its reply subject (keys, quotes)."""

HEARTBEAT = 2.0
"""Seconds between a callee's `Working` signals (the caller's setting travels in the call).
A call silent for this long before its first sign, or for `SILENT_AFTER` intervals after
it, is re-sent; silence after the re-send fails it `unavailable`."""
MIN_HEARTBEAT = 0.05
"""The shortest interval a callee heeds (a caller asking for less gets this)."""
SILENT_AFTER = 2
"""Intervals without a sign that mean a callee that had acknowledged a call is gone: one
late heartbeat on a busy machine is tolerated, a dead process is noticed within ~2."""
ACK_FRACTION = 2
"""A callee acknowledges a call it has held for heartbeat/ACK_FRACTION without answering:
calls answered sooner (nearly all, when the callee is healthy) cost no extra message, and
a burst queued at a busy callee is not answered by a burst of acknowledgements."""
ANSWERED_ENTRIES = 10_000
ANSWERED_BYTES = 64 * 1024 * 1024
"""Bounds of the callee's cache of sent answers (kept until the call's deadline passes),
from which a re-sent call is answered without running it again."""
ANSWERED_TTL = 600.0
"""How long an answer to a call without a deadline is kept for re-sends."""

_WORKING = b'{"type":"working"'
_NO_RESPONDERS = "503"


def _refused_login(e: Exception) -> bool:
    return "authorization" in str(e).lower() or "authentication" in str(e).lower()


def _connect_cause(said: list[Exception], timeout: float) -> str:
    """The one line that says why connecting failed, and what to do about it."""
    if login := next((e for e in said if _refused_login(e)), None):
        return (
            f"the server refused the login ({login}); check --user/--password or --rights "
            "(the credential file for this peer and session)"
        )
    if any(isinstance(e, ConnectionRefusedError) for e in said):
        return (
            "connection refused: no server listens there; "
            "start one (`council run` embeds one) or pass the right --nats URL"
        )
    if oserror := next((e for e in reversed(said) if isinstance(e, OSError)), None):
        if not isinstance(oserror, TimeoutError):
            return f"{oserror.strerror or oserror}; check the --nats URL and the network"
    if said and not isinstance(said[-1], TimeoutError) and str(said[-1]):
        return f"{said[-1]}; check the --nats URL"
    return (
        f"no answer within {timeout:g} s (host unreachable or a firewall drops the "
        "packets); check the --nats URL and the network"
    )


class Bus:
    def __init__(
        self,
        nc: NATS,
        *,
        session: str,
        name: str,
        default_timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float = HEARTBEAT,
    ):
        if not heartbeat > 0:
            raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r}")
        self.nc = nc
        self.session = subjects.check_name(session, "session")
        self.name = subjects.check_name(name, "peer name")
        self.default_timeout = default_timeout
        self.heartbeat = heartbeat
        self.spill_threshold = SPILL_THRESHOLD
        self._store: Store | None = None
        self._store_lock: anyio.Lock | None = None
        # One inbox subscription for every call this bus makes; a reply subject's last token
        # names the pending call it answers (nats-py's request() would take the first
        # message, a heartbeat, as the answer).
        self._inbox: str | None = None
        self._inbox_cut = 0  # len(inbox) + 1: where a reply subject's call token starts
        self._inbox_opening: anyio.Event | None = None  # set once a call's opening is over
        self._pending: dict[str, _Pending] = {}
        self._next_token = 0
        self._watch: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected = True
        self._reconnected = -inf
        self._subjects: dict[tuple[str, str], str] = {}  # (session, callee) -> call subject
        self._served_until: dict[tuple[str, str], float] = {}  # callees seen serving
        self._probing: set[tuple[str, str]] = set()
        self._outbox: dict[str, list[_Pending]] = {}  # call subject -> batched calls to send

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        session: str,
        name: str,
        user: str | None = None,
        password: str | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        heartbeat: float = HEARTBEAT,
    ) -> Bus:
        subjects.check_name(session, "session")
        subjects.check_name(name, "peer name")
        bound = _log.bind(session=session, peer=name)

        made: list[Bus] = []  # the Bus, once built: it settles calls the server refused
        # What the socket or server said while connecting: the cause the user is shown.
        # A refused login is final (retrying cannot fix a password): stop at once.
        said: list[Exception] = []
        connecting = anyio.CancelScope()

        async def on_error(e: Exception) -> None:
            if not made:
                said.append(e)
                bound.debug("nats.connect_error", error=str(e) or type(e).__name__)
                if _refused_login(e):
                    connecting.cancel()
                return
            bound.warning("nats.error", error=str(e) or type(e).__name__)
            if made:
                made[0]._on_nats_error(e)

        async def on_disconnect() -> None:
            bound.info("nats.disconnected")
            if made:
                made[0]._connected = False

        async def on_reconnect() -> None:
            bound.info("nats.reconnected")
            if made:
                await made[0]._on_reconnected()

        nc = None
        try:
            with anyio.fail_after(connect_timeout), connecting:
                nc = await nats.connect(
                    url,
                    name=f"{session}.{name}",
                    user=user,
                    password=password,
                    inbox_prefix=subjects.inbox_prefix(session, name),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.1,
                    connect_timeout=connect_timeout,
                    allow_reconnect=True,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                )
        except Exception as e:  # nats-py raises bare OSErrors, its own types; ours: TimeoutError
            said.append(e)
        if nc is None:
            raise Unavailable(
                f"cannot connect to NATS at {url}: {_connect_cause(said, connect_timeout)}"
            ) from (said[-1] if said else None)
        bus = cls(
            nc, session=session, name=name, default_timeout=default_timeout, heartbeat=heartbeat
        )
        made.append(bus)
        return bus

    async def close(self) -> None:
        if not self.nc.is_closed:
            with anyio.CancelScope(shield=True):
                try:
                    await self.nc.drain()
                except nats.errors.Error as e:
                    # Draining needs a live connection; with the server gone (the end of
                    # `council run`, a restart) there is nothing left to flush: just close.
                    _log.debug("bus.drain_failed", peer=self.name, error=repr(e))
                    await self.nc.close()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for p in list(self._pending.values()):
            p.fail(Unavailable("the bus was closed", call_id=p.call.id, callee=p.call.callee))

    async def store(self) -> Store:
        """The shared store of this bus's session, on this bus's connection (opened once)."""
        if self._store is None:
            if self._store_lock is None:
                self._store_lock = anyio.Lock()
            async with self._store_lock:
                if self._store is None:
                    self._store = await Store.open(self.nc, scope=self.session)
        return self._store

    async def _spill_call(self, call: Call, size: int) -> Call:
        """Move the biggest of the context and the args to the store until the call is small."""
        store = await self.store()
        parts: dict[str | None, Any] = {None: call.context, **call.args}  # None: the context
        sizes = {
            k: n
            for k, v in parts.items()
            if v is not None and not isinstance(v, Ref) and (n := len(_json_bytes(v))) > 1024
        }
        for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if size <= self.spill_threshold:
                break
            parts[key] = await store.put(parts[key])
            size -= sizes[key]
        context = parts.pop(None)
        return call.model_copy(update={"context": context, "args": parts})

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- calling ---------------------------------------------------------------------------

    def make_call(
        self,
        callee: str,
        prompt: str = "",
        *,
        context: Value = None,
        args: dict[str, Any] | None = None,
        timeout: float | None = None,
        parent: Call | None = None,
    ) -> Call:
        """A Call from this party; under `parent`, depth, deadline and budget are inherited."""
        deadline = time.time() + (self.default_timeout if timeout is None else timeout)
        if parent is not None and parent.deadline is not None:
            deadline = min(deadline, parent.deadline)
        return Call(
            session=self.session,
            caller=self.name,
            callee=subjects.check_name(callee, "peer name"),
            prompt=prompt,
            context=context,
            args=args or {},
            depth=parent.depth + 1 if parent else 0,
            deadline=deadline,
            budget=parent.budget if parent else None,
            parent=parent.id if parent else None,
            root=(parent.root or parent.id) if parent else None,
            heartbeat=self.heartbeat,
        )

    async def call(
        self,
        callee: str,
        prompt: str = "",
        *,
        context: Value = None,
        args: dict[str, Any] | None = None,
        timeout: float | None = None,
        parent: Call | None = None,
        keep_refs: bool = False,
    ) -> Reply:
        return await self.send(
            self.make_call(
                callee, prompt, context=context, args=args, timeout=timeout, parent=parent
            ),
            keep_refs=keep_refs,
        )

    async def send(self, call: Call, *, keep_refs: bool = False, batched: bool = False) -> Reply:
        """Send a prepared `Call`; return its `Reply` or raise the failure's typed error.

        The call goes out under this bus's own name (the subject says who calls, and a
        callee refuses a body that claims otherwise), so a call made elsewhere is re-signed.
        A call bigger than `spill_threshold` travels with its context (then its biggest args)
        as store Refs. A reply the callee's bus spilled is read back from the store, unless
        `keep_refs` (then `reply.value` is the Ref and `reply.spilled` is True).

        `batched` (a fan-out's items) lets the call leave at the end of this loop turn in one
        `Batch` message with the other batched calls to the same callee sent in that turn;
        everything else about it (liveness, re-sends, cancel, its answer) is its own.
        """
        if call.caller != self.name or call.heartbeat is None:
            call = call.model_copy(
                update={"caller": self.name, "heartbeat": call.heartbeat or self.heartbeat}
            )
        subject = self._subjects.get((call.session, call.callee))
        if subject is None:
            subject = subjects.call(call.session, call.callee, self.name)
            self._subjects[call.session, call.callee] = subject
        data = encode(call)
        if len(data) > self.spill_threshold:
            call = await self._spill_call(call, len(data))
            data = encode(call)
        remaining = call.remaining()
        if remaining is None:
            remaining = self.default_timeout
        if remaining <= 0:
            raise CallTimeout(
                f"call to {call.callee!r} has no time left (deadline passed)",
                call_id=call.id,
                callee=call.callee,
            )
        if len(data) > self.nc.max_payload:
            raise MalformedMessage(
                f"call to {call.callee!r} is {len(data)} bytes, over the server's max_payload of "
                f"{self.nc.max_payload}; pass large data as context= so it travels by reference"
            )
        inbox = self._inbox or await self._open_inbox()
        self._next_token += 1
        token = str(self._next_token)
        loop = asyncio.get_running_loop()
        p = _Pending(call, subject, data, f"{inbox}.{token}", loop, remaining)
        self._pending[token] = p
        if self._watch is None:
            self._watch = loop.call_later(self.heartbeat / 4, self._check)
        try:
            if batched:
                self._enqueue(p)
            else:
                try:
                    await self.nc.publish(subject, data, reply=p.reply)
                except (
                    nats.errors.ConnectionClosedError,
                    nats.errors.OutboundBufferLimitError,
                ) as e:
                    raise _not_sent(e, call) from None
            self._presence(call.session, call.callee)
            msg = await p.future
        except CallTimeout:
            await self._cancel(call, "caller timed out")
            raise
        except Unavailable:
            await self._cancel(call, "caller gave up: no sign of life")  # if it is only slow
            raise
        except anyio.get_cancelled_exc_class():
            await self._cancel(call, "caller was cancelled")
            raise
        finally:
            p.timer.cancel()
            del self._pending[token]
        try:
            answer = decode(msg.data)
        except MalformedMessage as e:
            raise PeerError(
                f"{call.callee!r} sent a malformed answer: {e}", call_id=call.id, callee=call.callee
            ) from None
        if isinstance(answer, Failure):
            raise error_for(answer, call.callee)
        if not isinstance(answer, Reply) or answer.id != call.id:
            raise PeerError(
                f"{call.callee!r} answered call {call.id} with {type(answer).__name__} "
                f"{getattr(answer, 'id', '')!r}",
                call_id=call.id,
                callee=call.callee,
            )
        if answer.spilled and not keep_refs and isinstance(answer.value, Ref):
            value = await (await self.store()).get(answer.value)
            answer = answer.model_copy(update={"value": value, "spilled": False})
        return answer

    def _enqueue(self, p: _Pending) -> None:
        """Hold a batched call until the end of this loop turn: the calls a fan-out sends in
        one turn leave together, and none waits for more than that turn."""
        box = self._outbox.get(p.subject)
        if box is None:
            box = self._outbox[p.subject] = []
            self._spawn(self._flush(p.subject))
        box.append(p)

    async def _flush(self, subject: str) -> None:
        """Publish the calls held for `subject`, as few messages as the batch limits allow."""
        held = [p for p in self._outbox.pop(subject, ()) if not p.future.done()]
        budget = min(BATCH_BYTES, self.nc.max_payload // 2)
        for chunk in _chunks(held, budget):
            first = chunk[0]
            if len(chunk) == 1:
                data = first.data
            else:
                data = encode(Batch(calls=[Addressed(reply=p.reply, call=p.call) for p in chunk]))
                for p in chunk:
                    p.batch = chunk
            try:
                await self.nc.publish(subject, data, reply=first.reply)
            except nats.errors.Error as e:  # no caller awaits this task: each item is told
                for p in chunk:
                    p.fail(_not_sent(e, p.call))

    async def _open_inbox(self) -> str:
        """Subscribe this bus's one reply inbox, once. The calls that wait for it (a fan-out's
        first items) wake together, not one per loop turn as a lock would let them, so they
        still leave in one batch."""
        opening = self._inbox_opening
        if opening is not None:
            await opening.wait()
            return self._inbox or await self._open_inbox()  # the opener failed: try again
        self._inbox_opening = opening = anyio.Event()
        try:
            inbox = self.nc.new_inbox()
            # Subscribed before the first call is published on the same connection, so the
            # server has it before any answer can come: no flush needed.
            await self.nc.subscribe(
                inbox + ".*",
                cb=self._on_answer,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=1 << 30,
            )
            self._inbox_cut = len(inbox) + 1
            self._inbox = inbox
        finally:
            self._inbox_opening = None
            opening.set()
        return inbox

    async def _on_answer(self, msg: Msg) -> None:
        p = self._pending.get(msg.subject[self._inbox_cut :])
        if p is None or p.future.done():
            return  # an answer to a call given up on, or a duplicate after a re-send
        data = msg.data
        if not data and msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            for q in p.batch or (p,):  # a batch's message is answered on its first item's
                if not q.future.done():
                    self._nobody_serves(q)
        elif data.startswith(_WORKING):
            p.heard = time.monotonic()
            p.acked = True
        else:
            p.future.set_result(msg)

    def _presence(self, session: str, callee: str) -> None:
        """Ask, at most once a heartbeat per callee, whether anyone serves it. Its calls
        would tell on their own (the server answers "no responders"), but not while a
        recorder or progress view listens on the whole session: then only this does."""
        key = (session, callee)
        if key in self._probing or self._served_until.get(key, -inf) > time.monotonic():
            return
        self._probing.add(key)
        self._spawn(self._probe(key))

    async def _probe(self, key: tuple[str, str]) -> None:
        try:
            await self.nc.request(subjects.presence(*key), b"", timeout=self.heartbeat)
        except nats.errors.NoRespondersError:
            for p in list(self._pending.values()):
                if (p.call.session, p.call.callee) == key and not p.future.done():
                    self._nobody_serves(p)
        except Exception:  # slow, or reconnecting: the heartbeat watch still judges
            pass
        else:
            self._served_until[key] = time.monotonic() + self.heartbeat
        finally:
            self._probing.discard(key)

    def _nobody_serves(self, p: _Pending) -> None:
        """No process subscribes to the callee's calls (the server said so at once)."""
        call = p.call
        if time.monotonic() - self._reconnected < SILENT_AFTER * p.beat:
            # Back from a server restart before the callee: it will subscribe again shortly.
            self._loop_later(p.beat / ACK_FRACTION, p)
            return
        if p.acked:
            message = (
                f"{call.callee!r} stopped serving while it held this call (its process is "
                "gone and no other process serves it); start it again and retry"
            )
        else:
            message = (
                f"no peer named {call.callee!r} is serving in session {call.session!r}; "
                "check the name and that the peer was started"
            )
        p.fail(Unavailable(message, call_id=call.id, callee=call.callee))

    def _check(self) -> None:
        """The liveness watch: re-send a silent call once, fail it if the re-send is silent."""
        self._watch = None
        now = time.monotonic()
        for p in list(self._pending.values()):
            if p.future.done():
                continue
            if not self._connected:  # nothing can be heard while cut off: judge after
                p.heard = now
                continue
            window = SILENT_AFTER * p.beat if p.acked else p.beat
            if now - max(p.heard, p.asked) <= window:
                continue
            if p.asked > 0 and p.heard < p.asked:
                call = p.call
                _log.warning("call.silent", call=call.id, callee=call.callee, silent=now - p.heard)
                p.fail(
                    Unavailable(
                        f"{call.callee!r} went silent: no sign of it for {now - p.heard:.3g}s "
                        f"(it signals every {p.beat:g}s), nor after the call was sent again; "
                        "its process probably died. Retry once it is serving again",
                        call_id=call.id,
                        callee=call.callee,
                    )
                )
                continue
            _log.info("call.resent", call=p.call.id, callee=p.call.callee, silent=now - p.heard)
            p.asked = now
            self._spawn(self._republish(p))
        if self._pending:
            self._watch = asyncio.get_running_loop().call_later(self.heartbeat / 4, self._check)

    def _loop_later(self, delay: float, p: _Pending) -> None:
        asyncio.get_running_loop().call_later(delay, lambda: self._spawn(self._republish(p)))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _republish(self, p: _Pending) -> None:
        if p.future.done():
            return
        try:
            await self.nc.publish(p.subject, p.data, reply=p.reply)
        except Exception as e:  # the watch (or the deadline) still ends the call
            _log.debug("call.not_resent", call=p.call.id, error=str(e))

    async def _on_reconnected(self) -> None:
        """Send every pending call again: some were published into the dead connection."""
        now = self._reconnected = time.monotonic()
        self._connected = True
        pending = [p for p in self._pending.values() if not p.future.done()]
        for p in pending:
            p.heard, p.asked, p.acked = now, 0.0, False
        if pending:
            _log.info("calls.resent_on_reconnect", calls=len(pending))
        for p in pending:
            await self._republish(p)

    def _on_nats_error(self, e: Exception) -> None:
        # Permission refusals arrive asynchronously (an -ERR, via error_cb), never as a
        # reply: fail the calls on that subject at once instead of letting them go silent.
        text = str(e)
        if "permissions violation for publish to" not in text.lower():
            return
        subject = text.rsplit(" to ", 1)[-1].strip().strip('"').lower()
        for p in list(self._pending.values()):
            if p.subject.lower() == subject and not p.acked:
                call = p.call
                p.fail(
                    PermissionDenied(
                        f"{call.caller!r} may not call {call.callee!r} (the server refused: "
                        f"{text}); if it should, add {call.callee!r} to {call.caller!r}'s calls "
                        "in the council",
                        call_id=call.id,
                        callee=call.callee,
                    )
                )

    async def _cancel(self, call: Call, reason: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.nc.publish(
                    subjects.cancel(call.session, call.callee, self.name),
                    encode(Cancel(id=call.id, reason=reason)),
                )
            except Exception as e:  # best effort: the callee's deadline still stops it
                _log.debug("cancel.not_sent", call=call.id, error=str(e))

    # -- events ----------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Fire and forget: a failure to publish an event never fails the work it describes."""
        try:
            await self.nc.publish(
                subjects.event(event.session, event.peer, event.type), encode(event)
            )
        except Exception as e:
            _log.debug("event.not_sent", type=event.type, error=str(e))

    # -- serving ---------------------------------------------------------------------------

    async def serve(
        self,
        peer: str,
        handler: Handler,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        only: Callable[[Call], bool] | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer calls to `peer` until cancelled; up to `concurrency` handlers run at once.

        Use as `await tg.start(bus.serve, "critic", handler)`: it returns once subscribed.
        Every process serving the same `peer` joins one queue group: each call goes to one.
        With `only`, this server sees every call to `peer` instead and answers those `only`
        accepts, leaving the rest, unseen, to whoever they are for (a REPL worker whose name
        another process's worker may have taken too).
        """
        server = _Server(self, peer, handler, concurrency, only)
        await server.run(task_status)


def _not_sent(e: nats.errors.Error, call: Call) -> CallFailed:
    """The typed error for a call NATS would not take."""
    if isinstance(e, nats.errors.OutboundBufferLimitError):
        return Unavailable(
            "disconnected from NATS and the outgoing buffer is full; retry once the "
            "connection is back",
            call_id=call.id,
            callee=call.callee,
        )
    if isinstance(e, nats.errors.ConnectionClosedError):
        return Unavailable("the bus connection is closed", call_id=call.id, callee=call.callee)
    return Unavailable(f"the call could not be published: {e}", call_id=call.id, callee=call.callee)


def _chunks(held: list[_Pending], budget: int) -> list[list[_Pending]]:
    """Calls in send order, cut into runs of at most BATCH_CALLS calls and `budget` encoded
    bytes; a call bigger than the budget is a run of its own (sent as a single call)."""
    chunks: list[list[_Pending]] = []
    run: list[_Pending] = []
    size = 0
    for p in held:
        n = len(p.data) + len(p.reply) + BATCH_ITEM_OVERHEAD
        if run and (len(run) >= BATCH_CALLS or size + n > budget):
            chunks.append(run)
            run, size = [], 0
        run.append(p)
        size += n
    if run:
        chunks.append(run)
    return chunks


def _json_bytes(value: Any) -> bytes:
    return to_json(value, by_alias=True)


class _Pending:
    """A call this bus sent and still waits for."""

    __slots__ = (
        *("call", "subject", "data", "reply", "future", "timer"),
        *("beat", "heard", "asked", "acked", "batch"),
    )

    def __init__(
        self,
        call: Call,
        subject: str,
        data: bytes,
        reply: str,
        loop: asyncio.AbstractEventLoop,
        remaining: float,
    ):
        self.call, self.subject, self.data, self.reply = call, subject, data, reply
        self.future: asyncio.Future[Msg] = loop.create_future()
        self.timer = loop.call_later(remaining, self._expire, remaining)
        self.beat: float = call.heartbeat or HEARTBEAT
        self.heard = time.monotonic()  # the last sign of the callee (or when it was sent)
        self.asked = 0.0  # when it was last re-sent for silence (0: never)
        self.acked = False  # the callee has said it holds the call
        self.batch: list[_Pending] | None = None  # the calls that left in one message with it

    def fail(self, error: CallFailed) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def _expire(self, remaining: float) -> None:
        self.fail(
            CallTimeout(
                f"{self.call.callee!r} did not answer within {remaining:.3g}s",
                call_id=self.call.id,
                callee=self.call.callee,
            )
        )


class _Held:
    """A call this server holds, queued or running, and everyone waiting for its answer."""

    __slots__ = ("call", "cancelled", "key", "replies", "scope", "timer")

    def __init__(self, call: Call, caller: str, reply: str):
        self.call = call
        self.key = (caller, call.id)
        self.replies = [reply]
        self.scope: anyio.CancelScope | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.cancelled = False


class _Server:
    def __init__(
        self,
        bus: Bus,
        peer: str,
        handler: Handler,
        concurrency: int,
        only: Callable[[Call], bool] | None = None,
    ):
        self.bus = bus
        self.peer = subjects.check_name(peer, "peer name")
        self.handler = handler
        self.only = only
        self.limiter = anyio.Semaphore(concurrency)
        # Keyed by (caller, call id): a call id is only unique per caller, and one caller
        # must never attach to, cancel, or be answered from the cache of another's call.
        self.held: dict[tuple[str, str], _Held] = {}
        self.answered: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self.answered_bytes = 0
        self.log = _log.bind(session=bus.session, peer=peer)
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[Any]] = set()

    async def run(self, task_status: TaskStatus[None]) -> None:
        nc = self.bus.nc
        session = self.bus.session
        subs = [
            await nc.subscribe(
                subjects.call(session, self.peer, subjects.ANY),
                queue=self.peer if self.only is None else "",
                cb=self._on_call,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=1 << 30,
            ),
            await nc.subscribe(
                subjects.cancel(session, self.peer, subjects.ANY), cb=self._on_cancel
            ),
            await nc.subscribe(
                subjects.presence(session, self.peer), queue=self.peer, cb=self._on_presence
            ),
        ]
        try:
            await settle(nc)
            task_status.started()
            self.log.info("serving")
            await anyio.sleep_forever()
        finally:
            await unsubscribe(subs)
            with anyio.CancelScope(shield=True):
                for held in self.held.values():
                    if held.timer is not None:
                        held.timer.cancel()
                for task in self.tasks:
                    task.cancel()
                await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        # A bare asyncio task costs a third of an anyio task-group spawn, and this is the
        # hot path; `tasks` keeps them owned, and run()'s finally reaps them.
        task = self.loop.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, reply: str, data: bytes) -> None:
        try:
            await self.bus.nc.publish(reply, data)
        except Exception as e:  # the caller's watch re-sends, and is answered from the cache
            self.log.warning("reply.not_sent", error=str(e))

    async def _on_call(self, msg: Msg) -> None:
        # nats-py awaits this inline, one message at a time: take the call in and hand it
        # off; never wait here, so every held call is acknowledged and heartbeaten.
        caller = msg.subject.rpartition(".")[2]
        if not self._answerable(msg.reply, caller):
            return
        try:
            message = decode(msg.data)
        except MalformedMessage as e:
            self.log.warning("call.malformed", caller=caller, reason=str(e))
            await self._send(
                msg.reply,
                encode(
                    Failure(
                        kind="bad_request", message=f"{self.peer!r} could not read the request: {e}"
                    )
                ),
            )
            return
        if not isinstance(message, Batch):
            await self._take(message, caller, msg.reply)
            return
        # Each item exactly as if it had come alone, with its own reply subject.
        for item in message.calls:
            if self._answerable(item.reply, caller):
                await self._take(item.call, caller, item.reply)

    def _answerable(self, reply: str | None, caller: str) -> bool:
        """Whether answering `reply` publishes only to the caller named by the subject."""
        if subjects.is_reply_to(reply, self.bus.session, caller):
            return True
        # Answering would publish for someone else: refuse, and say so in the log.
        self.log.warning(
            "call.refused",
            kind="bad_request",
            caller=caller,
            reply=reply or None,
            reason="the reply subject is not in the caller's inbox",
        )
        return False

    async def _take(self, call: Any, caller: str, reply: str) -> None:
        """Take in one call (alone or from a batch): refuse, answer again, attach, or hold."""
        if self.only is not None and isinstance(call, Call) and not self.only(call):
            return  # another server's call: it answers (or its absence times the call out)
        failure = self._refusal(call, caller)
        if failure is not None:
            await self._send(reply, encode(failure))
            return
        assert isinstance(call, Call)
        key = (caller, call.id)
        held = self.held.get(key)
        if held is not None:  # a re-send of a call we hold: one more reply subject, same run
            if reply not in held.replies:
                held.replies.append(reply)
            await self._send(reply, encode(Working(id=call.id)))
            return
        answered = self.answered.get(key)
        if answered is not None:  # a re-send of a call we answered: the same answer again
            self.log.info("call.answered_again", call=call.id, caller=caller)
            await self._send(reply, answered[0])
            return
        held = self.held[key] = _Held(call, caller, reply)
        held.timer = self.loop.call_later(self._beat_of(call) / ACK_FRACTION, self._beat, held)
        self._spawn(self._handle(held))

    def _refusal(self, call: Any, caller: str) -> Failure | None:
        if not isinstance(call, Call):
            return Failure(
                kind="bad_request",
                message=f"{self.peer!r} expected a call, got a {call.type!r} message",
            )
        if call.caller != caller:
            self.log.warning("call.spoofed", call=call.id, caller=caller, claimed=call.caller)
            return Failure(
                id=call.id,
                kind="permission_denied",
                message=f"the call was sent by {caller!r} but claims to be from "
                f"{call.caller!r}; a caller may only speak for itself",
            )
        if call.callee != self.peer or call.session != self.bus.session:
            return Failure(
                id=call.id,
                kind="bad_request",
                message=f"call addressed to {call.session}/{call.callee} reached {self.peer!r}",
            )
        return None

    def _beat_of(self, call: Call) -> float:
        # The caller chooses, within reason: a tiny interval must not turn us into a flood.
        return max(call.heartbeat or self.bus.heartbeat, MIN_HEARTBEAT)

    def _beat(self, held: _Held) -> None:
        """Tell everyone waiting on a held call that it is still being worked on."""
        if self.held.get(held.key) is not held:
            return
        held.timer = self.loop.call_later(self._beat_of(held.call), self._beat, held)
        data = encode(Working(id=held.call.id))
        for reply in held.replies:
            self._spawn(self._send(reply, data))

    async def _on_presence(self, msg: Msg) -> None:
        if msg.reply and msg.reply.startswith(f"_INBOX.{self.bus.session}."):
            await self._send(msg.reply, b"")

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(msg.data)
        except MalformedMessage:
            return
        if not isinstance(cancel, Cancel):
            return
        # Only the caller of a call may withdraw it: the subject names who cancels.
        held = self.held.get((msg.subject.rpartition(".")[2], cancel.id))
        if held is None:
            return
        self.log.info("call.cancelled", call=cancel.id, reason=cancel.reason)
        held.cancelled = True
        if held.scope is not None:
            held.scope.deadline = -inf

    async def _handle(self, held: _Held) -> None:
        call = held.call
        try:
            try:  # no checkpoint (an extra loop turn per call) unless we must wait
                self.limiter.acquire_nowait()
            except anyio.WouldBlock:
                await self.limiter.acquire()
            try:
                answer = await self._answer(held)
            finally:
                self.limiter.release()
            data = encode(answer)
            if len(data) > self.bus.spill_threshold:
                data = await self._spill(answer, data)
            if len(data) > self.bus.nc.max_payload:
                data = encode(
                    Failure(
                        id=answer.id,
                        kind="peer_error",
                        message=f"{self.peer!r} produced a {len(data)}-byte answer, over the "
                        f"server's max_payload ({self.bus.nc.max_payload}); return a Ref instead",
                    )
                )
            # Remembered before it is let go, with no await between: a re-send finds it in
            # one table or the other, never in neither.
            self._remember(held, data)
            self._let_go(held)
            for reply in held.replies:
                await self._send(reply, data)
        except Exception as e:
            self.log.error("reply.not_sent", call=call.id, error=str(e), exc_info=True)
        finally:
            self._let_go(held)

    def _let_go(self, held: _Held) -> None:
        if held.timer is not None:
            held.timer.cancel()
        if self.held.get(held.key) is held:
            del self.held[held.key]

    def _remember(self, held: _Held, data: bytes) -> None:
        now = time.time()
        deadline = held.call.deadline
        self.answered[held.key] = (data, deadline if deadline is not None else now + ANSWERED_TTL)
        self.answered_bytes += len(data)
        answered = self.answered
        while answered and (
            len(answered) > ANSWERED_ENTRIES
            or self.answered_bytes > ANSWERED_BYTES
            or next(iter(answered.values()))[1] < now
        ):
            _, (old, _) = answered.popitem(last=False)
            self.answered_bytes -= len(old)

    async def _spill(self, answer: Reply | Failure, data: bytes) -> bytes:
        """Put a big reply value (or failure partial) in the store and send its Ref."""
        try:
            store = await self.bus.store()
            if isinstance(answer, Reply) and not isinstance(answer.value, Ref):
                ref = await store.put(answer.value)
                return encode(answer.model_copy(update={"value": ref, "spilled": True}))
            if isinstance(answer, Failure) and not isinstance(answer.partial, Ref):
                return encode(
                    answer.model_copy(update={"partial": await store.put(answer.partial)})
                )
        except Exception as e:
            self.log.error("reply.not_spilled", call=answer.id, error=str(e))
            return encode(
                Failure(
                    id=answer.id,
                    kind="peer_error",
                    message=f"{self.peer!r} produced a {len(data)}-byte answer and the store "
                    f"could not take it: {e}",
                )
            )
        return data

    async def _answer(self, held: _Held) -> Reply | Failure:
        call = held.call
        if held.cancelled:
            return Failure(id=call.id, kind="cancelled", message="the caller cancelled the call")
        remaining = call.remaining()
        if remaining is not None and remaining <= 0:
            return Failure(
                id=call.id, kind="timeout", message="the call's deadline passed before it started"
            )
        started = time.perf_counter()
        # One scope for both ways of stopping: the deadline, and a Cancel from the caller
        # (which `_on_cancel` marks by setting the deadline to -inf).
        scope = held.scope = anyio.CancelScope(
            deadline=anyio.current_time() + remaining if remaining else inf
        )
        try:
            with scope:
                result = await self.handler(call)
                return self._reply(call, result, time.perf_counter() - started)
            if scope.deadline == -inf:
                return Failure(
                    id=call.id, kind="cancelled", message="the caller cancelled the call"
                )
            return Failure(
                id=call.id,
                kind="timeout",
                message=f"{self.peer!r} ran out of time ({remaining:.3g}s) for this call",
            )
        except CallFailed as e:
            return e.to_failure(call.id)
        except Exception as e:
            self.log.warning("handler.raised", call=call.id, error=repr(e), exc_info=True)
            return Failure(
                id=call.id, kind="peer_error", message=f"{self.peer}: {type(e).__name__}: {e}"
            )

    def _reply(self, call: Call, result: Any, elapsed: float) -> Reply:
        if isinstance(result, Reply):
            usage = result.usage
            if not usage.wall_time:
                usage = usage.model_copy(update={"wall_time": elapsed})
            return result.model_copy(update={"id": call.id, "usage": usage})
        return Reply(id=call.id, value=result, usage=Usage(wall_time=elapsed))
