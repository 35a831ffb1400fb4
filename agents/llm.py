"""The LLM peer: one model served on the bus as a callable peer.

It reads the call's context itself (a `Ref` is fetched from the store here, never by
the caller), so an agent can hand a sub-model megabytes it never looked at. Between
the bus and the model sit the things every real API needs: a concurrency bound shared
by every peer using the same model object, retries with jittered backoff for rate
limits and outages only, and a refusal of contexts that cannot fit, worded in sizes
rather than as a provider's error dump.
"""

from __future__ import annotations

import json
import random
import time
import weakref
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus

from agents import task
from agents.lean import MODEL_PARAMS
from agents.models import (
    LiteLLMModel,
    Messages,
    MissingKey,
    Model,
    ModelResponse,
    ScriptError,
    as_model,
    classify,
    estimate_tokens,
    freeze_heap,
    litellm,
    message_tokens,
    retry_after,
)
from agents.schema import Mismatch, TypeSpec
from channels import log
from channels.bus import DEFAULT_CONCURRENCY, Bus
from channels.errors import (
    BadRequest,
    BudgetExhausted,
    CallFailed,
    CouncilError,
    PeerError,
    Unavailable,
)
from channels.messages import Call, Completion, Ref, Reply, Usage

_log = log.get("council.llm")

SIGNATURE = "(prompt: str, context=None) -> str"

# The event must fit in one NATS message (1 MiB by default): beyond this many characters in
# all, the longest contents are cut in the middle (the call itself still has the whole).
EVENT_CONTENT_LIMIT = 200_000


class _Limit:
    def __init__(self, size: int) -> None:
        self.size = size
        self.semaphore = anyio.Semaphore(size)


# One bound per model object, whichever peers serve it: the provider's rate limit is per
# model and key, not per peer name.
_limits: weakref.WeakKeyDictionary[Any, _Limit] = weakref.WeakKeyDictionary()


def _limit_for(model: Model, size: int) -> _Limit:
    try:
        limit = _limits.get(model)
        if limit is None:
            limit = _limits[model] = _Limit(size)
        elif limit.size != size:
            _log.warning("llm.concurrency_shared", model=model.name, kept=limit.size, asked=size)
        return limit
    except TypeError:  # a model object that cannot be weakly referenced or hashed
        return _Limit(size)


class LLMPeer:
    """Serves `model` as the peer `name`; see the module docstring for what it adds."""

    def __init__(
        self,
        name: str,
        model: Any,
        *,
        description: str = "",
        signature: str = SIGNATURE,
        concurrency: int = 8,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        serve_concurrency: int = DEFAULT_CONCURRENCY,
        output: Any = None,
        **litellm_kwargs: Any,
    ) -> None:
        """`output`: the type answers must have (pydantic model or TypeAdapter type): asked
        for as structured output where the model takes it, validated either way."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.name = name
        self.model = as_model(model, **litellm_kwargs)
        self.description = description or (
            f"a language model ({self.model.name}) that answers a prompt about an optional context"
        )
        self.output = TypeSpec.of(output) if output is not None else None
        if self.output is not None and signature == SIGNATURE:
            signature = f"(prompt: str, context=None) -> {self.output.describe()}"
        self.signature = signature
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.serve_concurrency = serve_concurrency
        self._limit = _limit_for(self.model, concurrency)

    def __repr__(self) -> str:
        return f"LLMPeer({self.name!r}, {self.model!r})"

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        prepare = getattr(self.model, "prepare", None)
        if prepare is not None:  # e.g. import litellm off the event loop, before serving
            await prepare()
        freeze_heap()  # what is loaded by now lives as long as the process: no GC stalls
        try:
            await bus.serve(
                self.name,
                partial(self.handle, bus),
                concurrency=self.serve_concurrency,
                task_status=task_status,
            )
        finally:
            aclose = getattr(self.model, "aclose", None)
            if aclose is not None:  # e.g. the lean path's HTTP session
                with anyio.CancelScope(shield=True):
                    await aclose()

    # -- one call ----------------------------------------------------------------------------

    async def handle(self, bus: Bus, call: Call) -> Reply:
        if call.budget is not None and call.budget.exhausted:
            raise BudgetExhausted(
                f"{self.name}: the call's budget is already spent ({call.budget}); the model "
                "was not asked. Raise the caller's budget or stop calling."
            )
        args = await _resolve_args(bus, call.args)
        params = _model_params(args)
        self._refuse_unreadable(call.context, params)
        context = await deref(bus, call.context)
        messages = build_messages(call.prompt, context, args)
        if not messages:
            raise BadRequest(
                f"{self.name}: nothing to ask the model: the call has no prompt, context or messages"
            )
        self._refuse_too_large(messages, params, context)
        wanted = getattr(self.model, "reads_task", ())
        if wanted:  # a scripted model that asks for the request or the input as fields
            params = {**params, **await _task(bus, call, context, wanted)}
        if self.output is None:
            text, usage = await self._ask(bus, call, messages, params)
            return Reply(value=text, usage=usage)
        return await self._typed(bus, call, messages, params)

    async def _ask(
        self, bus: Bus, call: Call, messages: Messages, params: dict[str, Any]
    ) -> tuple[str, Usage]:
        """One completion, published as an event."""
        started = time.perf_counter()
        response = await self._complete(messages, params, call)
        elapsed = time.perf_counter() - started
        usage = Usage(
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            cost=response.cost,
            model_calls=1,
        )
        await bus.publish(
            Completion(
                session=bus.session,
                peer=self.name,
                call=call.id,
                model=response.model or self.model.name,
                messages=_fit(messages),
                response=response.text,
                usage=usage.model_copy(update={"wall_time": elapsed}),
            )
        )
        return response.text, usage

    async def _typed(
        self, bus: Bus, call: Call, messages: Messages, params: dict[str, Any]
    ) -> Reply:
        """A reply of the declared type: structured output asked for where the model takes
        it, the JSON validated either way; a reply that does not fit is sent back with the
        errors, up to `TYPED_REPAIRS` times."""
        spec = self.output
        assert spec is not None
        if "response_format" not in params and _takes_response_format(self.model):
            params = {**params, "response_format": spec.response_format()}
        spent = Usage()
        messages = list(messages)
        for attempt in range(TYPED_REPAIRS + 1):
            text, usage = await self._ask(bus, call, messages, params)
            spent = spent + usage
            try:
                data = spec.unwrap(json.loads(_json_part(text)))
                return Reply(value=spec.validate_json_value(data, "the reply"), usage=spent)
            except (ValueError, Mismatch) as e:
                problem = "; ".join(e.errors) if isinstance(e, Mismatch) else f"not JSON ({e})"
            if attempt == TYPED_REPAIRS:
                raise PeerError(
                    f"{self.name}: {self.model.name} did not answer with a {spec.name} after "
                    f"{attempt + 1} tries (last problem: {problem}); use a model that follows "
                    "JSON schemas, or simplify the type",
                    usage=spent,
                )
            messages += [
                {"role": "assistant", "content": text},
                {
                    "role": "user",
                    "content": f"That reply does not fit {spec.describe()}: {problem}. "
                    "Answer again with JSON of that type only.",
                },
            ]
        raise AssertionError("unreachable")

    async def _complete(
        self, messages: Messages, params: dict[str, Any], call: Call
    ) -> ModelResponse:
        attempt = 0
        while True:
            try:
                async with self._limit.semaphore:
                    return await self.model.complete(messages, **params)
            except Exception as e:
                kind = classify(e)
                if kind != "transient" or attempt >= self.max_retries:
                    raise self._failure(e, kind, attempt + 1, messages) from e
                delay = self._delay(attempt, retry_after(e))
                remaining = call.remaining()
                if remaining is not None and delay >= remaining:
                    raise Unavailable(
                        f"{self.name}: {self.model.name} failed ({_brief(e)}) and the call's "
                        f"deadline ({remaining:.3g}s left) leaves no time to retry after "
                        f"{delay:.3g}s; give the call more time"
                    ) from e
                _log.info(
                    "llm.retry",
                    peer=self.name,
                    model=self.model.name,
                    attempt=attempt + 1,
                    delay=round(delay, 3),
                    error=_brief(e),
                )
                attempt += 1
                await anyio.sleep(delay)

    def _delay(self, attempt: int, hint: float | None) -> float:
        """Full jitter, so peers that were refused together do not come back together."""
        if hint is not None:
            return min(max(hint, 0.0), self.max_backoff)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))

    def _failure(self, e: Exception, kind: str, attempts: int, messages: Messages) -> CallFailed:
        model = self.model.name
        if kind == "too_large":
            return BadRequest(
                f"{self.name}: {model} refused the request as too long for its context window "
                f"(about {message_tokens(messages):,} tokens sent); split the context and ask "
                f"about the pieces. Provider said: {_brief(e)}"
            )
        if kind == "bad_request":
            return BadRequest(f"{self.name}: {model} refused the request: {_brief(e)}")
        if kind == "transient":
            return Unavailable(
                f"{self.name}: {model} still failing after {attempts} attempts ({_brief(e)}); "
                "try again later, or raise max_retries / lower concurrency"
            )
        if isinstance(e, (ScriptError, MissingKey)):
            return PeerError(f"{self.name}: {e}")
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"AuthenticationError", "PermissionDeniedError"}:
            return PeerError(
                f"{self.name}: {model} rejected the credentials ({_brief(e)}); set the "
                "provider's API key (e.g. OPENAI_API_KEY) in the environment of the process "
                "that runs this peer"
            )
        if "NotFoundError" in names:
            return PeerError(
                f"{self.name}: the provider does not know model {model!r} ({_brief(e)}); "
                "check the litellm model string"
            )
        return PeerError(f"{self.name}: {model} failed: {type(e).__name__}: {_brief(e)}")

    # -- refusing what cannot fit ------------------------------------------------------------

    def _refuse_unreadable(self, context: Any, params: dict[str, Any]) -> None:
        """Refuse a stored context that cannot fit before fetching it (it may be gigabytes).

        Four bytes a character at most and four characters a token make size/16 a token
        count the text cannot be under, so this never refuses what would have fit.
        """
        window = self.model.context_window
        if window is None or not isinstance(context, Ref):
            return
        floor = context.size // 16
        if floor > window:
            raise BadRequest(
                f"{self.name}: the context is {context.size:,} bytes (about "
                f"{context.size // 4:,} tokens) but {self.model.name} takes at most "
                f"{window:,} tokens; split the context and ask about the pieces"
            )

    def _refuse_too_large(self, messages: Messages, params: dict[str, Any], context: str | None):
        window = self.model.context_window
        if window is None:
            return
        tokens = message_tokens(messages)
        reserve = int(params.get("max_tokens") or 0)
        if tokens + reserve <= window:
            return
        parts = f"about {tokens:,} tokens"
        if context is not None:
            parts += f", of which the context is about {estimate_tokens(context):,}"
        if reserve:
            parts += f", plus max_tokens={reserve:,} for the answer"
        raise BadRequest(
            f"{self.name}: the request is {parts}, but {self.model.name} takes at most "
            f"{window:,} tokens; split the context and ask about the pieces, or use a model "
            "with a larger window"
        )


# -- typed replies and scripted models --------------------------------------------------------

TYPED_REPAIRS = 2
"""Times an LLM peer with a declared output type sends a reply that did not fit back."""


def _takes_response_format(model: Any) -> bool:
    """Whether to ask for structured output: scripted models and litellm models whose
    provider takes `response_format` (litellm's own table says which)."""
    if not isinstance(model, LiteLLMModel):
        return True
    try:
        lib = litellm()
        supported = lib.get_supported_openai_params(model=model.model) or []
    except Exception:
        return False
    return "response_format" in supported


def _json_part(text: str) -> str:
    """The JSON in a reply, with a Markdown fence around it taken off."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text.strip()


async def _task(bus: Bus, call: Call, context: str | None, wanted: Any) -> dict[str, Any]:
    """What a scripted model is given as fields: the request and its input. For an agent's
    model call they are the agent's own (agents.task); otherwise this call's own. A stored
    input is read only for a model that asks for it."""
    working = task.of(call)
    if working is not None:
        request, value = working
        if "context" in wanted and _holds_ref(value):
            value = await _resolve(await bus.store(), value)
    else:
        request, value = call.prompt, context if _holds_ref(call.context) else call.context
    fields = {"request": request, "context": value}
    return {k: v for k, v in fields.items() if k in wanted}


# -- building the request --------------------------------------------------------------------


async def deref(bus: Bus, value: Any) -> str | None:
    """The context as text, read from the store if it is a `Ref` (or holds some)."""
    if value is None:
        return None
    if isinstance(value, Ref) or _holds_ref(value):
        value = await _resolve(await bus.store(), value)
    return as_text(value)


async def _resolve_args(bus: Bus, args: dict[str, Any]) -> dict[str, Any]:
    """The args the model needs, read back if the caller's bus spilled them to the store.

    A long conversation in `messages` is exactly what a bus moves to the store when a
    call grows past its spill threshold; other args are not the model's and stay as sent.
    """
    needed = ("messages", "system", *MODEL_PARAMS)
    if not any(_holds_ref(args.get(k)) for k in needed):
        return args
    store = await bus.store()
    return {k: await _resolve(store, v) if k in needed else v for k, v in args.items()}


def _holds_ref(value: Any) -> bool:
    if isinstance(value, Ref):
        return True
    if isinstance(value, list):
        return any(_holds_ref(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_ref(v) for v in value.values())
    return False


async def _resolve(store: Any, value: Any) -> Any:
    if isinstance(value, Ref):
        try:
            return await store.get(value)
        except CallFailed:
            raise
        except CouncilError as e:
            raise BadRequest(
                f"the context {value!r} could not be read from the store ({e}); it may have "
                "been deleted with its session: put it again and pass the new Ref"
            ) from e
    if isinstance(value, list):
        return [await _resolve(store, v) for v in value]
    if isinstance(value, dict):
        return {k: await _resolve(store, v) for k, v in value.items()}
    return value


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return json.dumps(value, ensure_ascii=False, default=repr)


def build_messages(prompt: str, context: str | None, args: dict[str, Any]) -> Messages:
    """The chat for one call: args.messages as given, then prompt and context as one user turn.

    The context goes before the question: models (small ones especially) answer better
    when the question is the last thing they read.
    """
    messages = _check_messages(args.get("messages"))
    system = args.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise BadRequest(f"args.system must be a string, got {type(system).__name__}")
        messages.insert(0, {"role": "system", "content": system})
    if context is not None and prompt:
        messages.append({"role": "user", "content": f"Context:\n{context}\n\n{prompt}"})
    elif context is not None:
        messages.append({"role": "user", "content": context})
    elif prompt:
        messages.append({"role": "user", "content": prompt})
    return messages


def _check_messages(raw: Any) -> Messages:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(
            f"args.messages must be a list of {{'role', 'content'}} dicts, got {type(raw).__name__}"
        )
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise BadRequest(
                f"args.messages[{i}] must be a dict with a 'role' string and 'content', got {m!r:.200}"
            )
        out.append(dict(m))
    return out


def _model_params(args: dict[str, Any]) -> dict[str, Any]:
    # only model parameters: the rest of args is not the model's business (an agent
    # forwarding its own args must not break the request)
    params = {k: v for k, v in args.items() if k in MODEL_PARAMS and v is not None}
    max_tokens = params.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise BadRequest(f"args.max_tokens must be a positive integer, got {max_tokens!r}")
    temperature = params.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or temperature < 0
    ):
        raise BadRequest(f"args.temperature must be a number >= 0, got {temperature!r}")
    return params


def _fit(messages: Messages) -> Messages:
    """Messages for the event, cut in the middle where needed so the event stays sendable."""
    total = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    if total <= EVENT_CONTENT_LIMIT:
        return messages
    cap = max(EVENT_CONTENT_LIMIT // len(messages), 200)
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str) and len(content) > cap:
            half = cap // 2
            cut = len(content) - 2 * half
            content = f"{content[:half]}\n[... {cut:,} characters cut ...]\n{content[-half:]}"
            m = {**m, "content": content}
        out.append(m)
    return out


def _brief(e: BaseException, limit: int = 300) -> str:
    """A provider error's first line, not its dump.

    litellm's own HTTP handler quotes the provider's JSON error body whole
    (`... - {"error": {"message": ...}}`): the message inside is what a reader needs.
    """
    text = str(e).strip() or type(e).__name__
    start = text.find('{"error"')
    if start >= 0:
        try:
            body = json.loads(text[start:])
            message = body["error"]["message"] if isinstance(body["error"], dict) else None
        except (ValueError, KeyError, TypeError):
            message = None
        if isinstance(message, str) and message.strip():
            text = text[:start] + message.strip()
    first = text.splitlines()[0]
    return first if len(first) <= limit else first[:limit] + "..."
