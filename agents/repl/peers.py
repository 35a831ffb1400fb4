"""The functions model code calls: one per peer, their non-blocking forms, `parallel`, `store`.

Code runs on its own thread; every call here hands a coroutine to the worker's event
loop and waits on a future, so the loop keeps serving (and keeps hundreds of calls in
flight) while the code's thread is blocked. A failed call raises the typed `CallFailed`
subclass for its kind; inside a fan-out it comes back as that exception object, in its
place, so one bad item does not lose the other answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agents.repl.protocol import PeerInfo
from channels.errors import CallCancelled, CouncilError
from channels.messages import Ref, validate_value

if TYPE_CHECKING:
    from agents.repl.worker import Worker

MISSING: Any = object()


class Bridge:
    """Runs coroutines on the worker's loop from the code thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return _wait(self.submit(coro))


def _wait(fut: concurrent.futures.Future[Any], timeout: float | None = None) -> Any:
    try:
        return fut.result(timeout)
    except concurrent.futures.CancelledError:
        raise CallCancelled("the call was cancelled before it answered") from None


def to_value(obj: Any, what: str) -> Any:
    """A JSON value (Refs allowed anywhere) or a TypeError that says what to change."""
    if obj is None or isinstance(obj, str | int | float | bool | Ref):
        return obj
    try:
        return validate_value(obj)
    except ValidationError:
        raise TypeError(
            f"{what} must be JSON-like (str, int, float, bool, None, list, dict with str keys, "
            f"or a Ref), got {type(obj).__name__}; convert it first (e.g. str(x) or list(x))"
        ) from None


def json_size(value: Any, limit: int) -> int:
    """Encoded size, cheaply for the common case of a big string."""
    if isinstance(value, Ref) or value is None:
        return 0
    if isinstance(value, str):
        if len(value) > limit:
            return len(value)  # at least this many bytes: no need to encode
        return len(value.encode()) if len(value) * 4 > limit else len(value)
    return len(json.dumps(value, default=lambda r: "x" * 200, ensure_ascii=False).encode())


class Handle:
    """A call in flight; `.result()` waits for its value (or raises its typed error)."""

    def __init__(self, fut: concurrent.futures.Future[Any], label: str):
        self._fut = fut
        self._label = label

    def result(self, timeout: float | None = None) -> Any:
        return _wait(self._fut, timeout)

    def done(self) -> bool:
        return self._fut.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return self._fut.exception(timeout)
        except concurrent.futures.CancelledError:
            return CallCancelled("the call was cancelled before it answered")

    def cancel(self) -> bool:
        return self._fut.cancel()

    def outcome(self) -> Any:
        """The value, or the CouncilError it failed with (returned, not raised)."""
        try:
            return self.result()
        except CouncilError as e:
            return e

    def __repr__(self) -> str:
        state = "done" if self._fut.done() else "running"
        return f"<call {self._label} {state}>"


class PeerFunction:
    """`critic(prompt, context=None, **args)` in the namespace: calls the peer over the bus."""

    def __init__(self, worker: Worker, info: PeerInfo, fn_name: str):
        self._worker = worker
        self._bridge = worker.bridge
        self.info = info
        self.__name__ = fn_name
        self.__doc__ = (
            f"{fn_name}{info.signature}: {info.description or 'a peer on the council bus'}\n"
            f"{fn_name}.start(...) returns a handle (.result() waits); "
            f"{fn_name}.map(prompts, contexts=None) runs many at once, answers in order."
        )

    def __repr__(self) -> str:
        return f"<peer {self.__name__}{self.info.signature}>"

    def __call__(self, prompt: str = "", context: Any = None, **args: Any) -> Any:
        return self.start(prompt, context, **args).result()

    def start(self, prompt: str = "", context: Any = None, **args: Any) -> Handle:
        prompt, context, args = self._prepare(prompt, context, args)
        fut = self._bridge.submit(self._worker.call(self.info, prompt, context, args))
        return Handle(fut, f"{self.__name__}({_short(prompt)})")

    def map(
        self,
        prompts: str | Sequence[str],
        contexts: Iterable[Any] | None = None,
        *,
        raise_errors: bool = False,
        **args: Any,
    ) -> list[Any]:
        """One call per prompt (or per context, when `prompts` is one string), all at once.

        Answers come back in order. A failed item is its `CallFailed` object in the list,
        unless `raise_errors=True`, which raises the first failure and stops the rest.
        """
        items = self._pairs(prompts, contexts)
        args = to_value(args, f"{self.__name__}.map() keyword arguments")
        prepared = [self._prepare(p, c, args, checked=True) for p, c in items]
        coro = self._worker.fan_out(
            [(self.info, p, c, a) for p, c, a in prepared], raise_errors=raise_errors
        )
        return self._bridge.run(coro)

    def _pairs(self, prompts: Any, contexts: Any) -> list[tuple[str, Any]]:
        ctxs = None if contexts is None else list(contexts)
        if isinstance(prompts, str):
            if ctxs is None:
                raise TypeError(
                    f"{self.__name__}.map() takes a list of prompts; for one call use "
                    f"{self.__name__}(prompt)"
                )
            return [(prompts, c) for c in ctxs]
        plist = list(prompts)
        if ctxs is None:
            return [(p, None) for p in plist]
        if len(ctxs) != len(plist):
            raise ValueError(
                f"{self.__name__}.map() got {len(plist)} prompts and {len(ctxs)} contexts; "
                "pass one context per prompt, or one prompt string for all contexts"
            )
        return list(zip(plist, ctxs, strict=True))

    def _prepare(
        self, prompt: Any, context: Any, args: dict[str, Any], *, checked: bool = False
    ) -> tuple[str, Any, dict[str, Any]]:
        if not isinstance(prompt, str):
            raise TypeError(
                f"{self.__name__}(): the prompt must be a str, got {type(prompt).__name__}; "
                "pass data as context= instead"
            )
        if not checked:
            args = to_value(args, f"{self.__name__}() keyword arguments")
        known = self._worker.known_ref(context)
        if known is None:
            context = to_value(context, f"{self.__name__}(): context")
        else:
            context = known
        return prompt, context, args


def _short(text: str, n: int = 30) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def parallel(*calls: Any, raise_errors: bool = False) -> list[Any]:
    """Wait for several calls at once, answers in order.

    Each item is a handle (`critic.start(...)`) or a tuple `(peer, prompt)` /
    `(peer, prompt, {"context": ..., ...})`. A failure is its exception object in the list,
    unless `raise_errors=True`.
    """
    if len(calls) == 1 and isinstance(calls[0], list | tuple) and _all_items(calls[0]):
        calls = tuple(calls[0])
    handles = [_as_handle(c) for c in calls]
    if raise_errors:
        pending = {h._fut for h in handles}
        while pending:
            done, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_EXCEPTION
            )
            for fut in done:
                if not fut.cancelled() and fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
        return [h.result() for h in handles]
    concurrent.futures.wait([h._fut for h in handles])
    return [h.outcome() for h in handles]


def _all_items(seq: Sequence[Any]) -> bool:
    return all(isinstance(c, Handle | tuple) for c in seq) and not (
        seq and isinstance(seq[0], PeerFunction)
    )


def _as_handle(item: Any) -> Handle:
    if isinstance(item, Handle):
        return item
    if isinstance(item, tuple) and item and isinstance(item[0], PeerFunction):
        fn, *rest = item
        if len(rest) == 1:
            return fn.start(rest[0])
        if len(rest) == 2 and isinstance(rest[1], dict):
            return fn.start(rest[0], **rest[1])
    raise TypeError(
        "parallel() takes handles from peer.start(...) or tuples (peer, prompt) / "
        f"(peer, prompt, {{'context': ...}}), got {type(item).__name__}"
    )


class StoreView:
    """`store` in the namespace: the shared store, with blocking methods for plain code."""

    def __init__(self, worker: Worker):
        self._worker = worker
        self._bridge = worker.bridge

    def __repr__(self) -> str:
        return "<store: put(value) -> Ref, get(ref), bind(name, value), lookup(name), update(name, fn)>"

    def put(self, value: Any, *, keep: bool = False) -> Ref:
        """Store a value (str, bytes or JSON); returns its Ref."""
        if not isinstance(value, bytes):
            value = to_value(value, "store.put(value)")
        return self._bridge.run(self._worker.store_put(value, keep=keep))

    def get(self, ref: Ref) -> Any:
        """Read a stored value back (text, bytes or JSON, as it was put)."""
        if not isinstance(ref, Ref):
            raise TypeError(f"store.get() takes a Ref, got {type(ref).__name__}")
        return self._bridge.run(self._worker.store_get(ref))

    def bind(self, name: str, value: Any) -> int:
        """Set a named shared variable; returns its revision."""
        value = to_value(value, "store.bind(name, value)")
        return self._bridge.run(self._worker.with_store(lambda s: s.bind(name, value)))

    def lookup(self, name: str, default: Any = MISSING) -> Any:
        """Read a named shared variable (`default` if it is not set)."""

        async def go(s: Any) -> Any:
            if default is MISSING:
                return await s.lookup(name)
            return await s.lookup(name, default)

        return self._bridge.run(self._worker.with_store(go))

    def update(self, name: str, fn: Callable[[Any], Any]) -> Any:
        """Replace a named variable with fn(old value), retried if someone else wrote first."""
        return self._bridge.run(self._worker.with_store(lambda s: s.update(name, fn)))
