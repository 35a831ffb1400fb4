"""Request/reply between peers, with deadlines, cancellation and typed failures.

A `Bus` is one NATS connection acting for one named party (a peer, a worker, a
human endpoint) in one session. `call` sends a `Call` and returns the `Reply` or
raises the `CallFailed` subclass for the failure's kind; `serve` answers calls
for a peer name, many at once, until cancelled. `await bus.store()` is the session's
shared store on the same connection; a call or reply bigger than `spill_threshold` sends
its big values through it as `Ref`s (a spilled reply is read back for the caller).
"""

from __future__ import annotations

import asyncio
import time
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
    Call,
    Cancel,
    Event,
    Failure,
    Ref,
    Reply,
    Usage,
    Value,
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


class Bus:
    def __init__(
        self, nc: NATS, *, session: str, name: str, default_timeout: float = DEFAULT_TIMEOUT
    ):
        self.nc = nc
        self.session = subjects.check_name(session, "session")
        self.name = subjects.check_name(name, "peer name")
        self.default_timeout = default_timeout
        # Permission refusals arrive asynchronously (an -ERR, via error_cb), never as a reply:
        # calls to a subject not yet seen answered wait for either, so a refused call fails
        # at once with PermissionDenied instead of timing out. Known-good subjects skip this.
        self._routed: set[str] = set()
        self._refusal_waiters: dict[str, set[asyncio.Future[str]]] = {}
        self.spill_threshold = SPILL_THRESHOLD
        self._store: Store | None = None
        self._store_lock: anyio.Lock | None = None

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
    ) -> Bus:
        subjects.check_name(session, "session")
        subjects.check_name(name, "peer name")
        bound = _log.bind(session=session, peer=name)

        made: list[Bus] = []  # the Bus, once built: it settles calls the server refused

        async def on_error(e: Exception) -> None:
            bound.warning("nats.error", error=str(e) or type(e).__name__)
            if made:
                made[0]._on_nats_error(e)

        async def on_disconnect() -> None:
            bound.info("nats.disconnected")

        async def on_reconnect() -> None:
            bound.info("nats.reconnected")

        try:
            with anyio.fail_after(connect_timeout):
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
            raise Unavailable(
                f"cannot connect to NATS at {url}: {e or type(e).__name__}; start one (`council run` embeds one) "
                "or pass the right --nats URL"
            ) from e
        bus = cls(nc, session=session, name=name, default_timeout=default_timeout)
        made.append(bus)
        return bus

    async def close(self) -> None:
        if not self.nc.is_closed:
            with anyio.CancelScope(shield=True):
                await self.nc.drain()

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

    async def send(self, call: Call, *, keep_refs: bool = False) -> Reply:
        """Send a prepared `Call`; return its `Reply` or raise the failure's typed error.

        A call bigger than `spill_threshold` travels with its context (then its biggest args)
        as store Refs. A reply the callee's bus spilled is read back from the store, unless
        `keep_refs` (then `reply.value` is the Ref and `reply.spilled` is True).
        """
        subject = subjects.call(call.session, call.callee)
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
        try:
            msg = await self._request(subject, data, remaining)
        except nats.errors.NoRespondersError:
            raise Unavailable(
                f"no peer named {call.callee!r} is serving in session {call.session!r}; "
                "check the name and that the peer was started",
                call_id=call.id,
                callee=call.callee,
            ) from None
        except nats.errors.TimeoutError:
            await self._cancel(call, "caller timed out")
            raise CallTimeout(
                f"{call.callee!r} did not answer within {remaining:.3g}s",
                call_id=call.id,
                callee=call.callee,
            ) from None
        except anyio.get_cancelled_exc_class():
            await self._cancel(call, "caller was cancelled")
            raise
        except nats.errors.ConnectionClosedError:
            raise Unavailable(
                "the bus connection is closed", call_id=call.id, callee=call.callee
            ) from None
        except nats.errors.Error as e:
            if "permissions violation" in str(e).lower():
                raise PermissionDenied(
                    f"{call.caller!r} may not call {call.callee!r} (the server refused: {e}); "
                    f"if it should, add {call.callee!r} to {call.caller!r}'s calls in the council",
                    call_id=call.id,
                    callee=call.callee,
                ) from None
            raise Unavailable(
                f"NATS error calling {call.callee!r}: {e}", call_id=call.id, callee=call.callee
            ) from None
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

    async def _request(self, subject: str, data: bytes, timeout: float) -> Msg:
        if subject in self._routed:
            return await self.nc.request(subject, data, timeout=timeout)
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # nats-py lowercases the server's error text, so refusals are matched by lower case.
        waiters = self._refusal_waiters.setdefault(subject.lower(), set())
        waiters.add(refused)
        request = asyncio.ensure_future(self.nc.request(subject, data, timeout=timeout))
        try:
            await asyncio.wait({request, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiters.discard(refused)
            if not waiters:
                self._refusal_waiters.pop(subject.lower(), None)
            if not request.done():
                request.cancel()
                request.add_done_callback(_consume)
        if refused.done():
            raise nats.errors.Error(refused.result())  # mapped to PermissionDenied by send()
        error = request.exception()
        if error is None or isinstance(error, nats.errors.NoRespondersError):
            self._routed.add(subject)  # the server let it through: publishing is allowed
        return request.result()

    def _on_nats_error(self, e: Exception) -> None:
        text = str(e)
        if "permissions violation for publish to" not in text.lower():
            return
        subject = text.rsplit(" to ", 1)[-1].strip().strip('"').lower()
        for waiter in self._refusal_waiters.get(subject, ()):
            if not waiter.done():
                waiter.set_result(text)

    async def _cancel(self, call: Call, reason: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.nc.publish(
                    subjects.cancel(call.session, call.callee),
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
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer calls to `peer` until cancelled; up to `concurrency` handlers run at once.

        Use as `await tg.start(bus.serve, "critic", handler)`: it returns once subscribed.
        """
        server = _Server(self, peer, handler, concurrency)
        await server.run(task_status)


def _json_bytes(value: Any) -> bytes:
    return to_json(value, by_alias=True)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _Server:
    def __init__(self, bus: Bus, peer: str, handler: Handler, concurrency: int):
        self.bus = bus
        self.peer = subjects.check_name(peer, "peer name")
        self.handler = handler
        self.limiter = anyio.Semaphore(concurrency)
        self.running: dict[str, anyio.CancelScope] = {}
        self.log = _log.bind(session=bus.session, peer=peer)

    async def run(self, task_status: TaskStatus[None]) -> None:
        nc = self.bus.nc
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def on_call(msg: Msg) -> None:
            # nats-py awaits this inline, one message at a time: only hand off here.
            # A bare asyncio task costs a third of an anyio task-group spawn, and this is
            # the hot path; `tasks` keeps them owned, and the finally below reaps them.
            try:  # no checkpoint (an extra loop turn per call) unless we must wait
                self.limiter.acquire_nowait()
            except anyio.WouldBlock:
                await self.limiter.acquire()
            task = loop.create_task(self._handle(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        subs = [
            await nc.subscribe(
                subjects.call(self.bus.session, self.peer),
                queue=self.peer,
                cb=on_call,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=1 << 30,
            ),
            await nc.subscribe(subjects.cancel(self.bus.session, self.peer), cb=self._on_cancel),
        ]
        try:
            await settle(nc)
            task_status.started()
            self.log.info("serving")
            await anyio.sleep_forever()
        finally:
            await unsubscribe(subs)
            with anyio.CancelScope(shield=True):
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(msg.data)
        except MalformedMessage:
            return
        if isinstance(cancel, Cancel) and (scope := self.running.get(cancel.id)):
            self.log.info("call.cancelled", call=cancel.id, reason=cancel.reason)
            scope.deadline = -inf

    async def _handle(self, msg: Msg) -> None:
        try:
            answer = await self._answer(msg)
            if not msg.reply:
                return
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
            await self.bus.nc.publish(msg.reply, data)
        except Exception as e:
            self.log.error("reply.not_sent", error=str(e), exc_info=True)
        finally:
            self.limiter.release()

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

    async def _answer(self, msg: Msg) -> Reply | Failure:
        try:
            call = decode(msg.data)
        except MalformedMessage as e:
            self.log.warning("call.malformed", reason=str(e))
            return Failure(
                kind="bad_request", message=f"{self.peer!r} could not read the request: {e}"
            )
        if not isinstance(call, Call):
            return Failure(
                kind="bad_request",
                message=f"{self.peer!r} expected a call, got a {call.type!r} message",
            )
        if call.callee != self.peer or call.session != self.bus.session:
            return Failure(
                id=call.id,
                kind="bad_request",
                message=f"call addressed to {call.session}/{call.callee} reached {self.peer!r}",
            )
        remaining = call.remaining()
        if remaining is not None and remaining <= 0:
            return Failure(
                id=call.id, kind="timeout", message="the call's deadline passed before it started"
            )
        started = time.perf_counter()
        # One scope for both ways of stopping: the deadline, and a Cancel from the caller
        # (which `_on_cancel` marks by setting the deadline to -inf).
        scope = anyio.CancelScope(deadline=anyio.current_time() + remaining if remaining else inf)
        self.running[call.id] = scope
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
        finally:
            del self.running[call.id]

    def _reply(self, call: Call, result: Any, elapsed: float) -> Reply:
        if isinstance(result, Reply):
            usage = result.usage
            if not usage.wall_time:
                usage = usage.model_copy(update={"wall_time": elapsed})
            return result.model_copy(update={"id": call.id, "usage": usage})
        return Reply(id=call.id, value=result, usage=Usage(wall_time=elapsed))
