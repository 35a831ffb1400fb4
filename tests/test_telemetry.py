"""OpenTelemetry: a council spread over two processes exports one trace, received over
OTLP/HTTP by a local receiver and decoded with `opentelemetry-proto`, whose tree is the
tree `council trace` shows for the same session's cassette."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from agents.models import ScriptedModel
from channels.server import running_server
from council.cassette import Cassette
from council.declare import load_target
from council.session import Session
from council.telemetry import span_id, trace_id, wanted
from council.trace import build
from tests.conftest import serving_elsewhere
from tests.otlp_receiver import attributes, otlp_receiver

pytest.importorskip("opentelemetry.sdk", reason="telemetry needs the `otel` extra")
pytestmark = pytest.mark.anyio


COUNCIL = '''
"""A chair (an RLM agent, process A) asks a critic (a function, process B) which asks a
counter (a function, back in process A)."""
from agents.function import Peers
from council.declare import Agent, Council, Function


def counter(text: str) -> int:
    """Counts words."""
    return len(text.split())


async def critic(prompt: str, context: str, peers: Peers) -> str:
    """Checks a text."""
    n = await peers.counter(context)
    return f"{prompt}: {n} words, fine"


council = Council(
    entry="chair",
    peers=[
        Agent("chair", model="thinker", calls=["critic"]),
        Function(critic, calls=["counter"]),
        Function(counter),
    ],
)
'''

CHAIR = """```python
verdict = critic("check", context=context)
print(verdict)
FINAL(verdict)
```"""


def test_telemetry_is_off_unless_configured(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not wanted(None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    assert wanted(None)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not wanted(None)
    assert wanted("http://x:1") and not wanted(False)


def test_ids_come_from_call_ids():
    root = "0123456789abcdef0123456789abcdef"
    assert trace_id(root) == int(root, 16)
    assert span_id(root) == int(root[:16], 16)
    assert span_id("not-hex") == span_id("not-hex") != 0  # hashed, the same everywhere


async def test_a_two_process_council_is_one_trace_shaped_like_council_trace(tmp_path):
    file = tmp_path / "crossing.py"
    file.write_text(textwrap.dedent(COUNCIL))
    council = load_target(f"{file}:council")
    cassette = tmp_path / "crossing.jsonl"
    session = "tel" + os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OTEL_"))}
    with (
        otlp_receiver() as (url, got),
        running_server() as server,
        serving_elsewhere(f"{file}:council", "critic", server.url, session, env=env),
    ):
        model = ScriptedModel([CHAIR], name="thinker", usage=(90, 12), cost=0.001)
        async with Session(
            council,
            nats_url=server.url,
            session=session,
            local=["chair", "counter"],
            models={"thinker": model},
            record=cassette,
            telemetry=url,
        ) as s:
            result = await s.ask("review", context="three small words", timeout=60)
    assert result.value == "check: 3 words, fine"

    trace = build(Cassette.load(cassette))
    nodes = list(trace.nodes.values())
    spans = got.wait(len(nodes))
    assert len(spans) == len(nodes)
    root_id = result.call_id

    # One trace, and it is the request's call id.
    assert {s.trace_id.hex() for s in spans} == {root_id}
    # The same tree: every call of the cassette is a span with its parent's span as parent.
    by_span = {s.span_id: s for s in spans}
    for node in nodes:
        span = by_span[span_id(node.call.id).to_bytes(8, "big")]
        parent = node.call.parent
        assert span.parent_span_id == (span_id(parent).to_bytes(8, "big") if parent else b"")
        attrs = attributes(span)
        assert attrs["council.callee"] == node.call.callee
        assert attrs["council.status"] == node.status
        assert span.start_time_unix_nano <= span.end_time_unix_nano
    assert sorted(len(list(n.walk())) for n in trace.roots) == [len(nodes)]

    def only(name_start: str):
        found = [s for s in spans if s.name.startswith(name_start)]
        assert len(found) == 1, [s.name for s in spans]
        return found[0], attributes(found[0])

    # The function served by the other process sits under the chair's REPL code, and the
    # function it called back in this process under it.
    critic, critic_attrs = only("execute_tool critic")
    counter, _ = only("execute_tool counter")
    assert counter.parent_span_id == critic.span_id
    assert critic_attrs["gen_ai.tool.name"] == "critic"

    _, chat_attrs = only("chat thinker")  # GenAI conventions for the model call
    assert chat_attrs["gen_ai.operation.name"] == "chat"
    assert chat_attrs["gen_ai.request.model"] == "thinker"
    assert (chat_attrs["gen_ai.usage.input_tokens"], chat_attrs["gen_ai.usage.output_tokens"]) == (
        90,
        12,
    )
    assert chat_attrs["gen_ai.usage.cost"] == pytest.approx(0.001)

    agent, agent_attrs = only("invoke_agent chair")
    assert agent.parent_span_id == b"" and agent.span_id == span_id(root_id).to_bytes(8, "big")
    assert agent_attrs["council.usage.model_calls"] == 1

    _, repl_attrs = only("repl exec")
    assert "critic(" in repl_attrs["council.repl.code"]
    assert repl_attrs["council.repl.status"] == "ok"
    assert "3 words, fine" in repl_attrs["council.repl.output"]
    assert {r.get("service.name") for r in got.resources} == {"council"}
    assert {r.get("council.session") for r in got.resources} == {session}


FUNCTIONS = """
from agents.function import Peers
from council.declare import Council, Function


def counter(text: str) -> int:
    return len(text.split())


async def chair(prompt: str, peers: Peers) -> str:
    return f"{await peers.counter(prompt)} words"


council = Council(entry="chair", peers=[Function(chair, calls=["counter"]), Function(counter)])
"""


def test_council_run_exports_when_the_standard_variable_is_set(tmp_path):
    file = tmp_path / "functions.py"
    file.write_text(FUNCTIONS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OTEL_"))}
    with otlp_receiver() as (url, got):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = url
        env["OTEL_SERVICE_NAME"] = "review-app"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "council.cli",
                "run",
                f"{file}:council",
                "--prompt",
                "one two three",
                "--no-record",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "3 words" in out.stdout
        spans = got.wait(2)
    names = sorted(s.name for s in spans)
    assert names == ["execute_tool chair", "execute_tool counter"]
    chair = next(s for s in spans if s.name.endswith("chair"))
    counter = next(s for s in spans if s.name.endswith("counter"))
    assert counter.parent_span_id == chair.span_id and counter.trace_id == chair.trace_id
    assert {r["service.name"] for r in got.resources} == {"review-app"}


async def test_human_questions_llm_peers_and_failures_are_spans():
    from agents.human import ScriptedHuman
    from tests.test_events import COUNCIL, models

    with otlp_receiver() as (url, got):
        async with Session(
            COUNCIL, models=models(), humans={"ada": ScriptedHuman("ada", ["yes"])}, telemetry=url
        ) as s:
            result = await s.ask("the draft", context="a long draft", timeout=60)
        spans = got.wait(7)  # the request, 2 REPL calls, 2 model calls, the human, the checker
    assert result.value == {"note": "short note", "verdict": "yes"}
    by_name = {s.name: s for s in spans}
    assert {s.trace_id.hex() for s in spans} == {result.call_id}

    human = attributes(by_name["human ada"])
    assert human["council.human.question"] == "publish short note?"
    assert human["council.human.answer"] == "yes"

    (helper,) = [  # an LLM peer's completion
        a for a in map(attributes, spans) if a["council.callee"] == "helper"
    ]
    assert helper["gen_ai.operation.name"] == "chat" and helper["gen_ai.usage.output_tokens"] > 0

    failed = by_name["execute_tool checker"]
    assert failed.status.code == failed.status.STATUS_CODE_ERROR
    assert failed.status.message.startswith("peer_error: ")
    assert attributes(failed)["council.failure.kind"] == "peer_error"


@pytest.mark.parametrize("tokens_first", [True, False])
def test_a_model_calls_tokens_reach_its_span_whichever_arrives_first(tokens_first):
    """The answer and the completion event travel on different subscriptions; nats-py hands
    them over in no fixed order, and the span must carry the tokens either way."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from council.events import CallEnded, CallStarted, ModelTokens
    from council.telemetry import SpanMaker

    exporter = InMemorySpanExporter()
    maker = SpanMaker(exporter, "s1")
    call = "ab" * 16
    maker.on(CallStarted(session="s1", ts=1.0, call=call, root=call, caller="chair",
                         callee="helper", callee_kind="llm", prompt="sum up"))  # fmt: skip
    tokens = ModelTokens(session="s1", ts=1.1, call=call, peer="helper", model="m1",
                         input_tokens=12, output_tokens=5)  # fmt: skip
    ended = CallEnded(session="s1", ts=1.2, call=call, caller="chair", callee="helper",
                      value="short")  # fmt: skip
    for event in [tokens, ended] if tokens_first else [ended, tokens]:
        maker.on(event)
    assert maker.spans == 1  # made once both are in, not at the end of the session
    maker.close()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["gen_ai.usage.output_tokens"] == 5
    assert span.attributes["gen_ai.request.model"] == "m1"
    assert span.attributes["council.status"] == "ok"
