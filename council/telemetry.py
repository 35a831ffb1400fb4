"""A session as OpenTelemetry spans: every call, model completion, REPL execution and
human question, parented by the call tree, exported over OTLP (Phoenix, Jaeger, Tempo...).

Off unless configured: `Session(telemetry=...)` takes True (the standard `OTEL_*`
variables say where), an OTLP/HTTP base URL ("http://localhost:6006"), a SpanExporter, or
False; by default it is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`)
is set and `OTEL_SDK_DISABLED` is not true. Needs the `otel` extra.

How the tree crosses processes without a new header: every `Call` already carries its id,
its parent's id and its request's (root's) id. The trace id IS the root call id (both are
128 bits) and a span id is the first 64 bits of its call id, so a span's parent is known
from the call alone, in any process, and `council trace`'s ids find the span. The spans are
made by the session's one listener (council/events.py), which sees the calls of every
process of the session on the server; peers in other processes need no OTel set-up, and
no span is made twice.

Model calls follow the GenAI semantic conventions (`gen_ai.operation.name` = chat,
`gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.usage.input_tokens`/
`output_tokens`; the price as `gen_ai.usage.cost`, unknown prices left out); agents are
`invoke_agent`, function and MCP peers `execute_tool`. The rest is under `council.*`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import anyio

from channels import log
from channels.errors import CouncilError
from council.events import (
    CallEnded,
    CallStarted,
    Failed,
    HumanQuestion,
    ModelTokens,
    Other,
    ReplOutput,
    _AppEvent,
)

_log = log.get("council.telemetry")

ATTRIBUTE_LIMIT = 4000  # characters of a prompt, answer, code or output put on a span
FLUSH_TIMEOUT = 10.0


class TelemetryUnavailable(CouncilError, RuntimeError):
    """Telemetry was asked for but the `otel` extra is not installed."""


def wanted(setting: Any) -> bool:
    """Whether a session with this `telemetry=` setting exports spans."""
    if setting is None:
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            return False
        return bool(
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
    return setting is not False


def exporter(setting: Any) -> Any:
    """The SpanExporter a `telemetry=` setting means."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise TelemetryUnavailable(
            f"telemetry needs OpenTelemetry ({e}); install it with pip install 'rlm-council[otel]'"
        ) from e
    if setting is True or setting is None:
        return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, ...
    if isinstance(setting, str):
        if not setting.startswith(("http://", "https://")):
            raise ValueError(
                f"telemetry={setting!r}: give an OTLP/HTTP URL such as http://localhost:4318"
            )
        url = setting.rstrip("/")
        return OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces")
    if hasattr(setting, "export") and hasattr(setting, "shutdown"):
        return setting
    raise TypeError(f"telemetry={setting!r}: use True, False, an OTLP/HTTP URL or a SpanExporter")


# -- ids from call ids ---------------------------------------------------------------------


def trace_id(root: str) -> int:
    """The trace of a request: its root call id (a uuid4 hex) as a 128-bit int."""
    return _bits(root, 128)


def span_id(call: str) -> int:
    """A call's span: the first 64 bits of its id."""
    return _bits(call, 64)


def _bits(text: str, bits: int) -> int:
    digits = bits // 4
    if len(text) >= digits and all(c in "0123456789abcdef" for c in text[:digits]):
        value = int(text[:digits], 16)
    else:  # an id that is not hex: hash it (still the same in every process)
        value = int(hashlib.sha256(text.encode()).hexdigest()[:digits], 16)
    return value or 1


def _ns(ts: float) -> int:
    return int(ts * 1e9)


def _clip(text: Any) -> str:
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= ATTRIBUTE_LIMIT else text[: ATTRIBUTE_LIMIT - 1] + "…"


class SpanMaker:
    """App events -> finished spans. A call's span is made when its answer arrives (its
    start and end are then both known); a REPL call's waits for its output event."""

    def __init__(self, exporter: Any, session: str, *, service: str | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator

        maker = self

        class _FromCalls(IdGenerator):
            def generate_span_id(self) -> int:
                return maker._next_span

            def generate_trace_id(self) -> int:
                return maker._next_trace

        self._next_span = 1
        self._next_trace = 1
        service = service or os.environ.get("OTEL_SERVICE_NAME") or "council"
        resource = Resource.create(
            {
                "service.name": service,
                "openinference.project.name": service,  # Phoenix's project
                "council.session": session,
            }
        )
        self.provider = TracerProvider(resource=resource, id_generator=_FromCalls())
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("council")
        self.session = session
        self.started: dict[str, CallStarted] = {}
        self.models: dict[str, ModelTokens] = {}
        self.questions: set[str] = set()
        self.waiting: dict[str, tuple[CallStarted, CallEnded | Failed]] = {}  # REPL calls
        # Model calls whose answer came before their tokens: the two travel on different
        # subscriptions, which nats-py hands over in no fixed order.
        self.tokens_due: dict[str, tuple[CallStarted, CallEnded]] = {}
        self.spans = 0

    def on(self, event: _AppEvent) -> None:
        if isinstance(event, CallStarted):
            self.started[event.call or ""] = event
        elif isinstance(event, ModelTokens) and event.call:
            self.models[event.call] = event
            if event.call in self.tokens_due:
                self._span(*self.tokens_due.pop(event.call))
        elif isinstance(event, HumanQuestion) and event.call:
            self.questions.add(event.call)
        elif isinstance(event, CallEnded | Failed):
            start = self.started.pop(event.call or "", None)
            if start is None:
                return  # began before the listener did
            call = start.call or ""
            if start.callee_kind == "repl" and start.op == "exec":
                self.waiting[call] = (start, event)
            elif (
                isinstance(event, CallEnded)
                and start.callee_kind in ("model", "llm")
                and call not in self.models
            ):
                self.tokens_due[call] = (start, event)
            else:
                self._span(start, event)
        elif isinstance(event, ReplOutput) and event.call in self.waiting:
            start, end = self.waiting.pop(event.call)
            self._span(start, end, event)
        elif isinstance(event, Other):
            pass

    def close(self) -> None:
        """End what is left (calls with no answer are `unfinished`) and export everything."""
        for start, end in [*self.waiting.values(), *self.tokens_due.values()]:
            self._span(start, end)
        self.waiting.clear()
        self.tokens_due.clear()
        for start in list(self.started.values()):
            self._span(start, None)
        self.started.clear()
        self.provider.force_flush(int(FLUSH_TIMEOUT * 1000))
        self.provider.shutdown()

    def _span(
        self,
        start: CallStarted,
        end: CallEnded | Failed | None,
        output: ReplOutput | None = None,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        call = start.call or ""
        root = start.root or call
        name, attrs = self._describe(start, end, output)
        context = None
        if start.parent:
            parent = SpanContext(
                trace_id=trace_id(root),
                span_id=span_id(start.parent),
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        self._next_trace, self._next_span = trace_id(root), span_id(call)
        span = self.tracer.start_span(
            name,
            context=context,
            kind=SpanKind.CLIENT if start.callee_kind in ("model", "llm") else SpanKind.INTERNAL,
            attributes=attrs,
            start_time=_ns(start.ts),
        )
        if isinstance(end, Failed):
            span.set_status(Status(StatusCode.ERROR, f"{end.kind}: {end.message}"[:500]))
        elif end is None:
            span.set_status(Status(StatusCode.ERROR, "unfinished: no answer before the end"))
        span.end(end_time=_ns(max(end.ts if end else start.ts, start.ts)))
        self.spans += 1

    def _describe(
        self, start: CallStarted, end: CallEnded | Failed | None, output: ReplOutput | None
    ) -> tuple[str, dict[str, Any]]:
        kind = start.callee_kind
        a: dict[str, Any] = {
            "council.session": self.session,
            "council.call.id": start.call or "",
            "council.root.id": start.root or "",
            "council.caller": start.caller,
            "council.callee": start.callee,
            "council.callee.kind": kind,
            "council.depth": start.depth,
            "council.prompt": _clip(start.prompt),
        }
        if start.parent:
            a["council.parent.id"] = start.parent
        if isinstance(end, CallEnded):
            a["council.status"] = "ok"
            a["council.answer"] = _clip(end.value)
        elif isinstance(end, Failed):
            a["council.status"] = end.kind
            a["council.failure.kind"] = end.kind
            a["council.failure.message"] = _clip(end.message)
        else:
            a["council.status"] = "unfinished"
        if end is not None:
            u = end.usage
            a |= {
                "council.usage.input_tokens": u.input_tokens,
                "council.usage.output_tokens": u.output_tokens,
                "council.usage.model_calls": u.model_calls,
            }
            if u.cost is not None:
                a["council.usage.cost"] = u.cost
        name = f"call {start.callee}"
        model = self.models.pop(start.call or "", None)
        if model is not None or kind in ("model", "llm"):
            name = f"chat {model.model if model else start.callee}"
            a |= {"gen_ai.operation.name": "chat", "openinference.span.kind": "LLM"}
            if model is not None:
                a |= {
                    "gen_ai.request.model": model.model,
                    "gen_ai.response.model": model.model,
                    "gen_ai.usage.input_tokens": model.input_tokens,
                    "gen_ai.usage.output_tokens": model.output_tokens,
                    "llm.model_name": model.model,
                    "llm.token_count.prompt": model.input_tokens,
                    "llm.token_count.completion": model.output_tokens,
                }
                if model.cost is not None:
                    a["gen_ai.usage.cost"] = model.cost
        elif kind == "agent":
            name = f"invoke_agent {start.callee}"
            a |= {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": start.callee,
                "openinference.span.kind": "AGENT",
            }
        elif kind == "mcp" and not start.prompt:
            name = f"list_tools {start.callee}"
        elif kind in ("function", "mcp"):
            tool = f"{start.callee}.{start.prompt}" if kind == "mcp" else start.callee
            name = f"execute_tool {tool}"
            a |= {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": tool,
                "openinference.span.kind": "TOOL",
            }
        elif kind == "repl":
            name = f"repl {start.op or 'call'} {start.caller}"
            a["council.repl.op"] = start.op or ""
            if start.op == "exec":
                a["council.repl.code"] = _clip(start.prompt)
            if output is not None:
                a["council.repl.status"] = output.status
                a["council.repl.output"] = _clip(output.output)
        elif kind == "human" or start.call in self.questions:
            self.questions.discard(start.call or "")
            name = f"human {start.callee}"
            a["council.human.question"] = _clip(start.prompt)
            if isinstance(end, CallEnded):
                a["council.human.answer"] = _clip(end.value)
        return name, a


async def attach(session: Any) -> SpanMaker | None:
    """Export `session`'s spans while it runs, if its `telemetry` setting (or the
    environment) asks for it; the session's end flushes them."""
    setting = getattr(session, "telemetry", None)
    if not wanted(setting):
        return None
    maker = SpanMaker(exporter(setting), session.session)
    stream = await session.events().start()
    done = anyio.Event()

    async def consume() -> None:
        try:
            async for event in stream:
                maker.on(event)
        finally:
            done.set()

    async def finish() -> None:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
            with anyio.move_on_after(5):
                await done.wait()
            with anyio.move_on_after(FLUSH_TIMEOUT + 2):
                await anyio.to_thread.run_sync(maker.close, abandon_on_cancel=True)
        _log.info("telemetry.exported", session=session.session, spans=maker.spans)

    session.call_in(consume)
    session._stack.push_async_callback(finish)
    return maker
