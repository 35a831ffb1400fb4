"""Models: one small protocol that every backend (litellm, scripted, a function) satisfies.

The LLM peer only ever sees `Model.complete`, so a test's scripted model goes through
exactly the code path a paid API does. litellm is imported lazily, and only after its
remote price table is switched off, because importing it takes seconds and, without
`LITELLM_LOCAL_MODEL_COST_MAP`, tries the network.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict

from channels import log
from channels.errors import CouncilError

Messages = list[dict[str, Any]]

_log = log.get("council.models")


class ModelResponse(BaseModel):
    """One completion with what it cost; `cost` is None when the price is unknown."""

    model_config = ConfigDict(frozen=True)

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    model: str = ""


@runtime_checkable
class Model(Protocol):
    name: str
    context_window: int | None

    async def complete(self, messages: Messages, **params: Any) -> ModelResponse: ...


# -- errors --------------------------------------------------------------------------------


class ModelError(CouncilError):
    """A model call failed in a way the LLM peer knows how to report."""


class TransientModelError(ModelError):
    """Rate limited or unreachable: the same request may succeed later.

    Raised by scripted models (and by anything wrapping a backend litellm does not know)
    to exercise the peer's retry path; litellm's own transient errors are recognised too.
    """

    def __init__(self, message: str = "transient model error", *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class MissingKey(ModelError):
    """The provider's API key is not set: no call can succeed until it is."""


class ScriptError(ModelError):
    """A scripted model was used differently from its script: a test bug, said plainly."""


ErrorClass = Literal["transient", "too_large", "bad_request", "fatal"]

_TRANSIENT = (
    "RateLimitError",
    "APIConnectionError",
    "Timeout",
    "APITimeoutError",
    "InternalServerError",
    "ServiceUnavailableError",
    "BadGatewayError",
)
_BAD_REQUEST = ("BadRequestError", "UnprocessableEntityError", "UnsupportedParamsError")


def classify(exc: BaseException) -> ErrorClass:
    """Which of the peer's responses an error deserves: retry, refuse as too large, refuse, fail.

    Matching on litellm's class names along the MRO keeps litellm unimported for users of
    scripted models, and catches its subclasses (a ContextWindowExceededError is also a
    BadRequestError, so it is checked first).
    """
    if isinstance(exc, TransientModelError):
        return "transient"
    if isinstance(exc, ScriptError):
        return "fatal"
    names = [c.__name__ for c in type(exc).__mro__]
    if "ContextWindowExceededError" in names:
        return "too_large"
    if any(n in _TRANSIENT for n in names):
        return "transient"
    if any(n in _BAD_REQUEST for n in names):
        return "bad_request"
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and (status == 429 or status >= 500):
        return "transient"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient"
    return "fatal"


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After hint in seconds, if it gave one."""
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, (int, float)):
        return float(hint)
    # litellm keeps the provider's headers on its own attribute; its `response` is rebuilt.
    sources = (
        getattr(exc, "litellm_response_headers", None),
        getattr(getattr(exc, "response", None), "headers", None),
    )
    for headers in sources:
        try:
            value = headers.get("retry-after") if headers is not None else None
            if value is not None:
                return float(value)
        except (AttributeError, TypeError, ValueError):
            continue  # an HTTP date: the peer's own backoff is good enough
    return None


# -- token estimates ---------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """About four characters a token: offline, instant at any size, and model-independent.

    A real tokenizer would need a download for most models and seconds for a big context;
    the estimate only has to be good enough to refuse a context far over the window.
    """
    return math.ceil(len(text) / 4)


def message_tokens(messages: Messages) -> int:
    return sum(estimate_tokens(_content_text(m.get("content"))) + 4 for m in messages)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


# -- litellm -------------------------------------------------------------------------------

_import_lock = threading.Lock()

# litellm sends `openai/` (and plain OpenAI) models through the OpenAI SDK unless this is
# set; with it, through its own aiohttp-based handler, the one it already uses for
# `hosted_vllm/` and most other providers. That path costs about a third less CPU per
# call (measured in BENCHMARKS.md), which is what bounds an LLM peer fanning out hundreds
# of sub-calls. litellm reads it on every call and has no per-call switch, so it is a
# process-wide default: a user who sets it (e.g. to "false") keeps their choice.
LEAN_OPENAI_ENV = "EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER"


def litellm() -> ModuleType:
    """Import litellm offline: local price table, no telemetry, no debug banners."""
    os.environ.setdefault(LEAN_OPENAI_ENV, "true")
    module = sys.modules.get("litellm")
    if module is not None and hasattr(module, "acompletion"):
        return module
    with _import_lock:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm as module

        module.suppress_debug_info = True
        module.telemetry = False
        # Its warnings (e.g. about its logging worker changing event loops) are noise here:
        # the LLM peer reports every failure itself, as a typed error.
        logging.getLogger("LiteLLM").setLevel(logging.ERROR)
        freeze_heap()
        return module


def freeze_heap() -> None:
    """Move everything allocated so far out of the garbage collector's sight.

    litellm leaves about 370k objects tracked by the collector; one full collection of
    them takes about 250 ms, and such pauses landed inside timed fan-outs. These objects
    (modules, tables, classes) live as long as the process, so they are collected once
    and frozen: later full collections scan only what came after. Collecting first also
    raises the bar for the next full collection (CPython waits until the objects promoted
    since the last one exceed a quarter of those it kept), so a fan-out of thousands of
    calls does not trigger one. Call it once the heavy imports are loaded; calling it
    again is cheap (the frozen objects are not scanned).
    """
    gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    if young < YOUNG_THRESHOLD:
        gc.set_threshold(YOUNG_THRESHOLD, *older)


# Allocations between young collections. CPython's 700 promotes the objects of every call in
# flight (messages, futures, responses) to older generations, and enough promotions trigger a
# full collection; at 10,000 they mostly die young. A young collection stays cheap (it scans
# at most this many objects).
YOUNG_THRESHOLD = 10_000


# Where litellm's callbacks and budget live: while all are empty, nothing reads the
# logging payload litellm builds after every call.
CALLBACK_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "service_callback",
    "audit_log_callbacks",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)
_CALLBACK_KWARGS = frozenset(n for n in CALLBACK_LISTS if not n.startswith("_")) | {"logger_fn"}


def _quiet_switch() -> Any:
    """litellm's own switch for calls whose success nobody logs; None if this litellm lacks it.

    litellm builds a standard logging payload for every response (about a quarter of
    its CPU on the event loop per call) even when no callback will read it. Its
    internal sub-calls skip that with this context variable. It is private, so a
    litellm without it simply keeps the slower path.
    """
    try:
        from litellm._internal_context import is_internal_call
    except ImportError:
        return None
    return is_internal_call


def _nobody_listens(lib: ModuleType, options: dict[str, Any]) -> bool:
    """No callback, logger or budget (global or for this call) would see litellm's logging."""
    if getattr(lib, "max_budget", 0):
        return False
    if any(getattr(lib, n, None) for n in CALLBACK_LISTS):
        return False
    return not any(options.get(k) for k in _CALLBACK_KWARGS)


_registered_prices: set[tuple[str, tuple[tuple[str, Any], ...]]] = set()


class LiteLLMModel:
    """Any litellm model string: `gpt-4o-mini`, `anthropic/...`, `ollama/...`, `openai/<name>`.

    `kwargs` go to every `litellm.acompletion` call (api_base, api_key, timeout, ...). Keys
    are read by litellm from this process's environment; nothing here ever sends them
    over the bus. Retries are the LLM peer's job, so litellm's and the OpenAI SDK's own
    are switched off (two retry layers would multiply the waits and hide the count).

    Prices given as kwargs (`input_cost_per_token=`, `output_cost_per_token=`, any of
    litellm's custom pricing fields) are registered with litellm once, under the model's
    `<provider>/<model>` key, instead of being sent with every call: litellm would
    re-register them on each call, and it registers them under that same shared key.
    """

    def __init__(
        self,
        model: str,
        *,
        name: str | None = None,
        context_window: int | None = None,
        lean: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ModelError(f"a litellm model string is required, got {model!r}")
        self.model = model
        self.name = name or model
        self.kwargs = kwargs
        self.lean = lean
        self._options: dict[str, Any] | None = None  # kwargs minus registered prices
        self._route: Any = None  # agents.lean.LeanRoute once resolved, when the model has one
        self._missing_key: str | None = None  # set by _ready(): the provider key not set
        self._context_window = context_window
        self._looked_up = context_window is not None

    def __repr__(self) -> str:
        return f"LiteLLMModel({self.model!r})"

    async def prepare(self) -> None:
        """Import litellm and look up the window in a thread: seconds the event loop keeps."""
        await anyio.to_thread.run_sync(lambda: (self._ready(), self.context_window))

    def _ready(self) -> ModuleType:
        """litellm, with this model's prices registered and its lean route resolved (once)."""
        lib = litellm()
        if self._options is None:
            self._missing_key = self._key_not_set(lib)
            options = self._register_prices(lib)
            self._route = self._resolve_route(lib, options)
            self._options = options
        return lib

    def _resolve_route(self, lib: ModuleType, options: dict[str, Any]) -> Any:
        if not self.lean:
            _log.debug("llm.path", model=self.model, path="litellm", reason="lean=False")
            return None
        from agents import lean

        route = lean.resolve(lib, self.model, options)
        if isinstance(route, str):
            _log.debug("llm.path", model=self.model, path="litellm", reason=route)
            return None
        _log.debug("llm.path", model=self.model, path="lean", provider=route.provider)
        return route

    @property
    def path(self) -> str:
        """ "lean" or "litellm": the path this model's calls take (resolving it if needed)."""
        self._ready()
        return "lean" if self._route is not None else "litellm"

    async def aclose(self) -> None:
        """Close the lean path's HTTP session on this event loop (the peer is stopping)."""
        if self._route is not None:
            await self._route.aclose()

    def _key_not_set(self, lib: ModuleType) -> str | None:
        """The provider's API key variable, when neither it nor an `api_key` is given.

        Without a key litellm's call fails only after the connection attempts (seconds of
        retries offline), then reads like an outage; this names the missing key at once.
        An `*_API_BASE` litellm lists is not a key (ollama has a default): ignored.
        """
        if self.kwargs.get("api_key"):
            return None
        try:
            missing = lib.validate_environment(self.model).get("missing_keys") or []
        except Exception:  # a model string litellm cannot place: its own call will say
            return None
        return next((k for k in missing if k.endswith(("_KEY", "_TOKEN"))), None)

    def _register_prices(self, lib: ModuleType) -> dict[str, Any]:
        """The per-call options, with custom prices moved into litellm's price table."""
        try:
            from litellm.types.utils import CustomPricingLiteLLMParams

            fields = set(CustomPricingLiteLLMParams.model_fields)
        except (ImportError, AttributeError):
            return dict(self.kwargs)  # an older litellm: leave the prices per call
        prices = {k: v for k, v in self.kwargs.items() if k in fields and v is not None}
        if not prices:
            return dict(self.kwargs)
        try:
            name, provider, _, _ = lib.get_llm_provider(
                model=self.model, api_base=self.kwargs.get("api_base")
            )
            key = f"{provider}/{name}"
            marker = (key, tuple(sorted((k, repr(v)) for k, v in prices.items())))
            if marker not in _registered_prices:
                entry: dict[str, Any] = {"litellm_provider": provider, **prices}
                if key not in lib.model_cost:
                    entry["mode"] = "chat"
                lib.register_model({key: entry})
                _registered_prices.add(marker)
        except Exception as e:
            _log.warning("litellm.prices_per_call", model=self.model, error=str(e))
            return dict(self.kwargs)
        return {k: v for k, v in self.kwargs.items() if k not in prices}

    @property
    def context_window(self) -> int | None:
        """From litellm's local model table; None for a model it does not list."""
        if not self._looked_up:
            self._looked_up = True
            try:
                info = litellm().get_model_info(self.model)
                window = info.get("max_input_tokens") or info.get("max_tokens")
                self._context_window = int(window) if window else None
            except Exception:
                self._context_window = None
        return self._context_window

    @context_window.setter
    def context_window(self, value: int | None) -> None:
        self._context_window = value
        self._looked_up = True

    async def complete(self, messages: Messages, **params: Any) -> ModelResponse:
        lib = litellm() if self._options is not None else self._ready()
        if self._missing_key is not None and not params.get("api_key"):
            raise MissingKey(
                f"{self.model} needs {self._missing_key}, which is not set in the environment "
                "of the process that runs this peer; export it (or pass api_key=...), or use "
                "a model that needs no key (--model local)"
            )
        route = self._route
        if route is not None:
            model_params = {**route.default_params, **params}
            why = route.why_not(model_params)
            if why is None:
                return await route.complete(messages, model_params)
            _log.debug("llm.path", model=self.model, path="litellm", reason=why)
        options = {"max_retries": 0, "num_retries": 0, **(self._options or {}), **params}
        quiet = _quiet_switch() if _nobody_listens(lib, options) else None
        token = quiet.set(True) if quiet is not None else None
        try:
            response = await lib.acompletion(model=self.model, messages=messages, **options)
        finally:
            if token is not None:
                quiet.reset(token)
        return read_response(response, self.model, lambda *_: _response_cost(response))

    def cost(self, input_tokens: int, output_tokens: int) -> float | None:
        """Dollars for this many tokens, when litellm knows the price; None otherwise."""
        lib = self._ready()
        try:
            prompt, completion = lib.cost_per_token(
                model=self.model, prompt_tokens=input_tokens, completion_tokens=output_tokens
            )
            return float(prompt + completion)
        except Exception:
            return None


def read_response(
    out: Any, model: str, cost: Callable[[Any, int, int], float | None]
) -> ModelResponse:
    """A litellm `ModelResponse` as ours, on either path; `cost(usage, input, output)`
    prices it the way that path can."""
    usage = getattr(out, "usage", None)
    input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    return ModelResponse(
        text=getattr(out.choices[0].message, "content", None) or "",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost(usage, input_tokens, output_tokens),
        model=getattr(out, "model", None) or model,
    )


def _response_cost(response: Any) -> float | None:
    """The cost litellm already worked out for this response (with any per-call prices).

    Asking `completion_cost` again would repeat the price lookup, which for a model
    missing from litellm's table is a slow failing search on every call. litellm leaves
    None there when it knows no price, and None is what this returns then.
    """
    hidden = getattr(response, "_hidden_params", None)
    try:
        if isinstance(hidden, dict):
            cost = hidden.get("response_cost")
        else:  # litellm's HiddenParams object, on some paths
            cost = getattr(hidden, "response_cost", None)
        return None if cost is None else float(cost)
    except (AttributeError, TypeError, ValueError):
        return None


# -- scripted models -----------------------------------------------------------------------


def _response(
    out: Any, messages: Messages, name: str, usage: tuple[int, int] | None, cost: float | None
) -> ModelResponse:
    if isinstance(out, ModelResponse):
        return out
    if not isinstance(out, str):
        raise ScriptError(
            f"scripted model {name!r} produced a {type(out).__name__}, not a str or "
            "ModelResponse; return the reply text"
        )
    input_tokens, output_tokens = usage or (message_tokens(messages), estimate_tokens(out))
    return ModelResponse(
        text=out,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost,
        model=name,
    )


class ScriptedModel:
    """Replies in order; each a str, a ModelResponse, a callable(messages), or an exception.

    Usage is deterministic: `usage=(input, output)` per call if given, else the
    four-characters-a-token estimate of the messages and the reply. Scripted models are
    free, so cost is 0.0 unless set. Calling it once more than scripted, or ending a test
    with replies unused (`assert_done`), is a `ScriptError` that shows where it went wrong.
    """

    def __init__(
        self,
        replies: Sequence[Any],
        *,
        name: str = "scripted",
        context_window: int | None = None,
        usage: tuple[int, int] | None = None,
        cost: float | None = 0.0,
    ) -> None:
        if isinstance(replies, (str, bytes)):
            raise ScriptError("ScriptedModel takes a list of replies, not a single string")
        self.replies = list(replies)
        self.name = name
        self.context_window = context_window
        self.usage = usage
        self.cost = cost
        self.calls: list[Messages] = []

    def __repr__(self) -> str:
        return f"ScriptedModel({self.name!r}, {len(self.calls)}/{len(self.replies)} used)"

    @property
    def remaining(self) -> int:
        return len(self.replies) - len(self.calls)

    @property
    def reads_task(self) -> frozenset[str]:
        """The task fields the next scripted reply (a function) names."""
        step = self.replies[len(self.calls)] if self.remaining > 0 else None
        if not callable(step) or isinstance(step, ModelResponse | BaseException):
            return frozenset()
        return _keywords(step)[0] & frozenset(TASK_FIELDS)

    async def complete(self, messages: Messages, **params: Any) -> ModelResponse:
        n = len(self.calls)
        self.calls.append(messages)
        if n >= len(self.replies):
            last = _content_text(messages[-1].get("content")) if messages else ""
            raise ScriptError(
                f"scripted model {self.name!r} has {len(self.replies)} replies but was called a "
                f"{_ordinal(n + 1)} time; the unexpected request ended with: {last[:200]!r}. "
                "Add a reply to the script or find why the code calls the model again."
            )
        step = self.replies[n]
        if isinstance(step, BaseException):
            raise step
        if callable(step) and not isinstance(step, ModelResponse):
            step = step(messages, **_given(_keywords(step), params))
            if inspect.isawaitable(step):
                step = await step
        return _response(step, messages, self.name, self.usage, self.cost)

    def assert_done(self) -> None:
        """Fail when scripted replies were never asked for (the code took a shorter path)."""
        if self.remaining > 0:
            raise ScriptError(
                f"scripted model {self.name!r} used {len(self.calls)} of {len(self.replies)} "
                f"replies; the next unused one is {self.replies[len(self.calls)]!r}"
            )


class FunctionModel:
    """A function as a model: fn(messages, **params) -> str | ModelResponse, sync or async.

    A sync function runs on the event loop, not in a thread: scripted functions are quick,
    and inline calls keep a script's shared state (an iterator, a list) free of races.
    """

    def __init__(
        self,
        fn: Callable[..., str | ModelResponse | Awaitable[str | ModelResponse]],
        *,
        name: str | None = None,
        context_window: int | None = None,
        usage: tuple[int, int] | None = None,
        cost: float | None = 0.0,
    ) -> None:
        if not callable(fn):
            raise ScriptError(f"FunctionModel needs a callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.context_window = context_window
        self.usage = usage
        self.cost = cost
        self._accepts = _keywords(fn)

    @property
    def reads_task(self) -> frozenset[str]:
        """The task fields the function names (the LLM peer reads only those)."""
        return self._accepts[0] & frozenset(TASK_FIELDS)

    def __repr__(self) -> str:
        return f"FunctionModel({self.name!r})"

    async def complete(self, messages: Messages, **params: Any) -> ModelResponse:
        out = self.fn(messages, **_given(self._accepts, params))
        if inspect.isawaitable(out):
            out = await out
        return _response(out, messages, self.name, self.usage, self.cost)


TASK_FIELDS = ("request", "context")
"""What the LLM peer gives a scripted model besides the messages: the request being worked
on and its input (an agent's own, for its model peer). A function gets them by naming
them as parameters, so `fn(messages, **params)` still sees only model parameters."""


def _keywords(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The named parameters `fn` takes after the messages, and whether it takes **kwargs."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return frozenset(), True
    rest = any(p.kind is p.VAR_KEYWORD for p in parameters)
    named = frozenset(
        p.name for p in parameters[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )
    return named, rest


def _given(accepts: tuple[frozenset[str], bool], params: dict[str, Any]) -> dict[str, Any]:
    named, rest = accepts
    return {k: v for k, v in params.items() if k in named or (rest and k not in TASK_FIELDS)}


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def as_model(spec: Any, **litellm_kwargs: Any) -> Model:
    """Whatever a user wrote where a model goes: a litellm string, a model, a function, a script."""
    if isinstance(spec, str):
        return LiteLLMModel(spec, **litellm_kwargs)
    if litellm_kwargs:
        raise ModelError(
            f"litellm options {sorted(litellm_kwargs)} only apply to a model string, "
            f"not to {type(spec).__name__}"
        )
    if isinstance(spec, (LiteLLMModel, ScriptedModel, FunctionModel)):
        return spec  # before the Protocol check, which would touch context_window (an import)
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, (list, tuple)):
        return ScriptedModel(spec)
    if callable(spec):
        return FunctionModel(spec)
    raise ModelError(
        f"cannot use {spec!r} as a model: pass a litellm model string (e.g. 'gpt-4o-mini'), "
        "a Model, a function of the messages, or a list of scripted replies"
    )
