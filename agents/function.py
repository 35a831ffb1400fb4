"""A plain Python callable served as a peer, so code and models are interchangeable.

How a `Call` becomes arguments (so a model's `word_count(text)` just works):

- `call.args` bind by parameter name;
- the prompt goes to a parameter named `prompt`, else to the first parameter not already
  bound (when the prompt is non-empty);
- the context goes to a parameter named `context`, else to the next unbound parameter
  (when there is a context); a `Ref` is read from the store unless the parameter is
  annotated `Ref` (the function then reads it itself);
- a parameter annotated `Call` receives the call itself, one annotated `Peers` a handle
  for calling other peers (`await peers.critic("...")`) as part of this call: deadline,
  depth and budget carry over, and their usage is added to this call's reply.

Every argument is validated against the parameter's type hint (pydantic, lax: "3" is a
fine int) and a bad one is a `BadRequest` that names the parameter, so a model calling
it wrongly reads what to fix. Sync callables run in a worker thread, so a slow function
never stalls the other calls this process serves.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from pydantic import TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError
from pydantic_core import to_jsonable_python

from channels import log, subjects
from channels.bus import DEFAULT_CONCURRENCY, Bus
from channels.errors import BadRequest, CouncilError
from channels.messages import Call, Ref, Reply, Usage

_log = log.get("council.function")

_EMPTY = inspect.Parameter.empty
_KINDS_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class NotAFunction(CouncilError, TypeError):
    """Something that cannot be served as a function peer."""


def signature_of(fn: Callable[..., Any]) -> str:
    """The callable's signature as a model reads it: `(text: str, top: int = 3) -> list[str]`."""
    sig, hints = _inspect(fn)
    parts: list[str] = []
    for p in sig.parameters.values():
        if hints.get(p.name) in _INJECTED:
            continue
        s = p.name
        if p.name in hints:
            s += f": {_type_name(hints[p.name])}"
        if p.default is not _EMPTY:
            s += f" = {p.default!r}"
        parts.append(s)
    ret = f" -> {_type_name(hints['return'])}" if "return" in hints else ""
    return f"({', '.join(parts)}){ret}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__ if tp.__module__ != "builtins" else tp.__name__
    return str(tp).replace("typing.", "")


def _inspect(fn: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Any]]:
    if not callable(fn):
        raise NotAFunction(f"{fn!r} is not callable; pass a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise NotAFunction(f"cannot read the signature of {fn!r}: {e}") from e
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
    if isinstance(fn, functools.partial):
        target = fn.func
    try:
        hints = typing.get_type_hints(target)
    except Exception as e:  # an unresolvable forward reference
        raise NotAFunction(
            f"cannot resolve the type hints of {fn!r}: {e}; import the types it names "
            "at module level"
        ) from e
    for p in sig.parameters.values():
        if (
            p.kind is inspect.Parameter.POSITIONAL_ONLY
            or p.kind is inspect.Parameter.VAR_POSITIONAL
        ):
            raise NotAFunction(
                f"{fn!r} has the positional-only parameter {p.name!r}; a peer's arguments "
                "arrive by name, so make it a normal parameter"
            )
    return sig, {k: v for k, v in hints.items() if k in sig.parameters or k == "return"}


def default_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def first_paragraph(doc: str | None) -> str:
    return inspect.cleandoc(doc).split("\n\n", 1)[0].replace("\n", " ") if doc else ""


class Peers:
    """How a function peer's code calls other peers: `await peers.critic("text")` or
    `await peers("critic", "text", context=ref)`; returns the answer's value.

    Only the callees the council lets this peer call will answer: the server refuses the
    rest (`PermissionDenied`).
    """

    def __init__(self, bus: Bus, call: Call) -> None:
        self._bus = bus
        self._call = call
        self.usage = Usage()

    async def __call__(
        self,
        peer: str,
        prompt: str = "",
        *,
        context: Any = None,
        timeout: float | None = None,
        **args: Any,
    ) -> Any:
        reply = await self._bus.call(
            peer, prompt, context=context, args=args or None, timeout=timeout, parent=self._call
        )
        self.usage = self.usage + reply.usage
        return reply.value

    def __getattr__(self, peer: str) -> Callable[..., Awaitable[Any]]:
        if peer.startswith("_"):
            raise AttributeError(peer)
        return functools.partial(self, peer)


_INJECTED = (Call, Peers)


async def _in_thread(fn: Callable[[], Any], name: str) -> Any:
    """Run a sync function in a daemon thread of its own.

    Not anyio's worker threads: a cancelled call abandons its thread, and an abandoned
    non-daemon thread would keep the process alive after Ctrl-C until the function returned.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if done.done():
            return  # the call was cancelled meanwhile
        if error is None:
            done.set_result(value)
        else:
            done.set_exception(error)

    def work() -> None:
        try:
            value, error = fn(), None
        except BaseException as e:
            value, error = None, e
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop is gone: nobody is waiting
            pass

    threading.Thread(target=work, name=f"council-fn-{name}", daemon=True).start()
    return await done


def _adapter(tp: Any) -> TypeAdapter[Any] | None:
    """A validator for a hint; None for a type pydantic cannot validate (passed as is)."""
    try:
        return TypeAdapter(tp)
    except PydanticSchemaGenerationError:
        return None


class FunctionPeer:
    """Serve `fn` (sync or async) as the peer `name`."""

    def __init__(
        self,
        name: str | None,
        fn: Callable[..., Any],
        description: str | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.fn = fn
        self.name = subjects.check_name(name or default_name(fn), "peer name")
        self._sig, self._hints = _inspect(fn)
        self.signature = signature_of(fn)
        self.description = (
            description if description is not None else first_paragraph(inspect.getdoc(fn))
        )
        self.concurrency = concurrency
        call_method = None if inspect.isfunction(fn) else type(fn).__dict__.get("__call__")
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call_method)
        self._adapters = {
            p.name: _adapter(self._hints.get(p.name, Any))
            for p in self._sig.parameters.values()
            if self._hints.get(p.name) not in _INJECTED
        }
        self._returns = _adapter(self._hints.get("return", Any)) or TypeAdapter(Any)
        self._bus: Bus | None = None

    def __repr__(self) -> str:
        return f"<FunctionPeer {self.name}{self.signature}>"

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        self._bus = bus
        await bus.serve(
            self.name, self.handle, concurrency=self.concurrency, task_status=task_status
        )

    async def handle(self, call: Call) -> Any:
        kwargs = await self.bind(call)
        if self._is_async:
            result = await self.fn(**kwargs)
        else:
            result = await _in_thread(functools.partial(self.fn, **kwargs), self.name)
        if isinstance(result, Reply):
            return result
        if not isinstance(result, Ref):
            try:
                result = self._returns.dump_python(result, mode="json")
            except Exception:
                result = to_jsonable_python(result, fallback=repr)
        spent = [v.usage for v in kwargs.values() if isinstance(v, Peers)]
        if spent:
            usage = sum(spent, Usage()).model_copy(update={"wall_time": 0.0})  # bus times us
            return Reply(value=result, usage=usage)
        return result

    async def bind(self, call: Call) -> dict[str, Any]:
        """Map the call onto the parameters and validate each; see the module docstring."""
        params = self._sig.parameters
        raw: dict[str, Any] = {}
        var_kw = next((p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        for key, value in call.args.items():
            p = params.get(key)
            if p is None or p.kind not in _KINDS_BY_NAME:
                if var_kw is None:
                    raise BadRequest(
                        f"{self.name} has no parameter {key!r}; it takes {self.signature}"
                    )
            raw[key] = value
        for p in params.values():
            if self._hints.get(p.name) is Call:
                raw[p.name] = call
            elif self._hints.get(p.name) is Peers:
                if self._bus is None:
                    raise BadRequest(f"{self.name} calls other peers: serve it with run(bus)")
                raw[p.name] = Peers(self._bus, call)
        free = [
            p.name
            for p in params.values()
            if p.kind in _KINDS_BY_NAME
            and p.name not in raw
            and self._hints.get(p.name) not in _INJECTED
        ]
        if "prompt" in free:
            raw["prompt"] = call.prompt
            free.remove("prompt")
        elif call.prompt:
            if not free:
                raise BadRequest(
                    f"{self.name} takes no prompt (all its parameters are given by name); "
                    f"it takes {self.signature}"
                )
            raw[free.pop(0)] = call.prompt
        if "context" in free:
            free.remove("context")
            raw["context"] = await self._context(call, "context")
        elif call.context is not None:
            if not free:
                raise BadRequest(f"{self.name} takes no context; it takes {self.signature}")
            name = free.pop(0)
            raw[name] = await self._context(call, name)
        missing = [n for n in free if params[n].default is _EMPTY]
        if missing:
            raise BadRequest(
                f"{self.name} is missing the argument{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)}; it takes {self.signature}"
            )
        return {k: self._validate(k, v) for k, v in raw.items()}

    async def _context(self, call: Call, param: str) -> Any:
        value = call.context
        if isinstance(value, Ref) and self._hints.get(param) is not Ref and self._bus:
            store = self._bus.store
            store = await store() if callable(store) else store
            value = await store.get(value)
        return value

    def _validate(self, name: str, value: Any) -> Any:
        adapter = self._adapters.get(name)
        if adapter is None or isinstance(value, _INJECTED):
            return value
        try:
            return adapter.validate_python(value)
        except ValidationError as e:
            problem = "; ".join(err["msg"] for err in e.errors()[:3])
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise BadRequest(
                f"{self.name}: parameter {name!r} got {shown}: {problem}; it takes {self.signature}"
            ) from None
