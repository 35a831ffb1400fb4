"""The LLM peer on a real nats-server: scripted models, and litellm against a local HTTP stub.

The stub is a real OpenAI-compatible HTTP server on loopback, reached through litellm's
`openai/` route with an api_base, so retries, error mapping and cost run through the
same litellm code a paid API would (only the far end is ours).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.llm import LLMPeer, build_messages
from agents.models import (
    FunctionModel,
    LiteLLMModel,
    ModelError,
    ModelResponse,
    ScriptedModel,
    ScriptError,
    TransientModelError,
    as_model,
    litellm,
)
from channels import subjects
from channels.errors import BadRequest, BudgetExhausted, PeerError, Unavailable
from channels.messages import Budget, Completion, Ref, decode
from tests.conftest import serving
from tests.scripted_http import ScriptedHTTP

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stub() -> Iterator[ScriptedHTTP]:
    """A real OpenAI-compatible server on loopback (tests/scripted_http.py)."""
    with ScriptedHTTP(usage=(1000, 100)) as server:
        yield server


# -- answers, usage, cost ----------------------------------------------------------------------


async def test_scripted_peer_answers_with_usage_and_cost(nats_server, session_id):
    model = ScriptedModel(["four", ModelResponse(text="five", input_tokens=7, output_tokens=2)])
    async with serving(nats_server.url, session_id, LLMPeer("llm", model)) as client:
        first = await client.call("llm", "What is 2 + 2?", timeout=10)
        second = await client.call("llm", "And 2 + 3?", timeout=10)
    assert first.value == "four"
    # Deterministic estimate: ceil(chars / 4) per message plus 4 for its framing.
    assert first.usage.input_tokens == -(-len("What is 2 + 2?") // 4) + 4
    assert first.usage.output_tokens == 1
    assert first.usage.cost == 0.0 and first.usage.model_calls == 1
    assert first.usage.wall_time > 0
    assert (second.value, second.usage.input_tokens, second.usage.output_tokens) == ("five", 7, 2)
    model.assert_done()


async def test_litellm_route_reports_tokens_and_known_price(nats_server, session_id, stub):
    model = LiteLLMModel("openai/gpt-4o-mini", api_base=stub.api_base, api_key="sk-stub")
    async with serving(nats_server.url, session_id, LLMPeer("llm", model)) as client:
        reply = await client.call("llm", "hello there", timeout=30)
    assert reply.value == "echo: hello there"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (1000, 100)
    info = litellm().get_model_info("gpt-4o-mini")
    expected = 1000 * info["input_cost_per_token"] + 100 * info["output_cost_per_token"]
    assert reply.usage.cost == pytest.approx(expected)
    assert reply.usage.model_calls == 1
    assert model.context_window == info["max_input_tokens"]


async def test_unknown_price_is_none_not_a_crash(nats_server, session_id, stub):
    model = LiteLLMModel("openai/council-stub-model", api_base=stub.api_base, api_key="sk-stub")
    assert model.context_window is None
    async with serving(nats_server.url, session_id, LLMPeer("llm", model)) as client:
        reply = await client.call("llm", "hi", timeout=30)
    assert reply.value == "echo: hi"
    assert reply.usage.cost is None
    assert reply.usage.input_tokens == 1000


# -- context -----------------------------------------------------------------------------------


async def test_context_ref_is_read_by_the_peer_not_the_caller(nats_server, session_id):
    seen: list[str] = []

    def reader(messages):
        seen.append(messages[-1]["content"])
        return "found 7341" if "secret is 7341" in messages[-1]["content"] else "nothing"

    text = "filler " * 100_000 + "the secret is 7341. " + "filler " * 1_000
    async with serving(nats_server.url, session_id, LLMPeer("llm", reader)) as client:
        store = await client.store()
        ref = await store.put(text)
        assert isinstance(ref, Ref)
        sent: list[int] = []

        async def watch(msg):
            sent.append(len(msg.data))

        sub = await client.nc.subscribe(subjects.call(session_id, "llm", subjects.ANY), cb=watch)
        reply = await client.call("llm", "What is the secret?", context=ref, timeout=30)
        await sub.unsubscribe()
    assert reply.value == "found 7341"
    assert seen[0].startswith("Context:\nfiller") and seen[0].endswith("What is the secret?")
    assert len(seen[0]) > len(text)
    # What crossed the bus was the Ref, not the 700 KB it names.
    assert sent and max(sent) < 5_000


async def test_spilled_conversation_is_read_back_by_the_peer(nats_server, session_id):
    """A chat too big to travel inline is moved to the store by the caller's bus."""
    seen: list[Any] = []

    def fn(messages):
        seen.append(messages)
        return "ok"

    long_turn = "y" * 300_000
    chat = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "and?"}]
    async with serving(nats_server.url, session_id, LLMPeer("llm", fn)) as client:
        sent: list[int] = []

        async def watch(msg):
            sent.append(len(msg.data))

        sub = await client.nc.subscribe(subjects.call(session_id, "llm", subjects.ANY), cb=watch)
        reply = await client.call("llm", "go on", args={"messages": chat}, timeout=30)
        await sub.unsubscribe()
    assert reply.value == "ok"
    assert seen == [[*chat, {"role": "user", "content": "go on"}]]
    assert sent and max(sent) < 5_000


async def test_messages_system_and_prompt_are_assembled():
    messages = build_messages(
        "and now?",
        "ctx",
        {"messages": [{"role": "user", "content": "hi"}], "system": "be brief"},
    )
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "Context:\nctx\n\nand now?"},
    ]
    assert build_messages("", None, {"messages": [{"role": "user", "content": "x"}]}) == [
        {"role": "user", "content": "x"}
    ]
    with pytest.raises(BadRequest, match=r"args.messages\[0\]"):
        build_messages("q", None, {"messages": [{"content": "no role"}]})


async def test_params_reach_the_model_and_bad_ones_are_refused(nats_server, session_id):
    got: list[dict[str, Any]] = []

    def fn(messages, **params):
        got.append(params)
        return "ok"

    async with serving(nats_server.url, session_id, LLMPeer("llm", FunctionModel(fn))) as client:
        args = {"max_tokens": 5, "temperature": 0.0, "conversation": "c1"}
        assert (await client.call("llm", "q", args=args, timeout=10)).value == "ok"
        with pytest.raises(BadRequest, match="max_tokens must be a positive integer"):
            await client.call("llm", "q", args={"max_tokens": "lots"}, timeout=10)
        with pytest.raises(BadRequest, match="nothing to ask"):
            await client.call("llm", "", timeout=10)
    # Model parameters pass; an agent's own args (conversation) do not reach the model.
    assert got == [{"max_tokens": 5, "temperature": 0.0}]


# -- too large ---------------------------------------------------------------------------------


async def test_context_too_large_is_a_bad_request_with_sizes(nats_server, session_id):
    calls: list[Any] = []
    model = FunctionModel(lambda m: calls.append(m) or "never", context_window=1_000)
    async with serving(nats_server.url, session_id, LLMPeer("small", model)) as client:
        with pytest.raises(BadRequest) as err:
            await client.call("small", "summarise", context="word " * 4_000, timeout=10)
        assert (
            "about 5,0" in err.value.message and "the context is about 5,000" in err.value.message
        )
        assert "at most 1,000 tokens" in err.value.message and "split" in err.value.message
        # A stored context that cannot fit is refused from its size, before it is fetched.
        store = await client.store()
        ref = await store.put("x" * 200_000)
        with pytest.raises(BadRequest, match=r"200,000 bytes .*at most 1,000 tokens"):
            await client.call("small", "summarise", context=ref, timeout=10)
        # max_tokens counts against the window too.
        with pytest.raises(BadRequest, match="max_tokens=990"):
            await client.call("small", "x" * 100, args={"max_tokens": 990}, timeout=10)
        assert (await client.call("small", "fits", timeout=10)).value == "never"
    assert len(calls) == 1


async def test_provider_context_error_is_a_short_bad_request(nats_server, session_id, stub):
    stub.fail(
        400,
        "This model's maximum context length is 4096 tokens. However, your messages "
        "resulted in 9000 tokens. Please reduce the length of the messages.",
        code="context_length_exceeded",
    )
    model = LiteLLMModel("openai/council-stub-model", api_base=stub.api_base, api_key="sk-stub")
    async with serving(nats_server.url, session_id, LLMPeer("llm", model)) as client:
        with pytest.raises(BadRequest) as err:
            await client.call("llm", "long question", timeout=30)
    assert "too long for its context window" in err.value.message
    assert "Traceback" not in err.value.message and "\n" not in err.value.message
    assert len(stub.requests) == 1


# -- retries -----------------------------------------------------------------------------------


async def test_rate_limits_are_retried_through_litellm_then_succeed(nats_server, session_id, stub):
    stub.fail(429, "Rate limit reached for requests", code="rate_limit_exceeded")
    stub.fail(503, "The server is overloaded")
    model = LiteLLMModel("openai/council-stub-model", api_base=stub.api_base, api_key="sk-stub")
    peer = LLMPeer("llm", model, backoff=0.05)
    async with serving(nats_server.url, session_id, peer) as client:
        reply = await client.call("llm", "hello", timeout=30)
    assert reply.value == "echo: hello"
    # Exactly three requests: two refused, one answered; nobody else retried behind our back.
    assert len(stub.requests) == 3
    assert reply.usage.model_calls == 1


async def test_bad_request_is_not_retried(nats_server, session_id, stub):
    stub.fail(400, "Invalid value for 'temperature': must be at most 2.")
    model = LiteLLMModel("openai/council-stub-model", api_base=stub.api_base, api_key="sk-stub")
    async with serving(nats_server.url, session_id, LLMPeer("llm", model, backoff=0.05)) as client:
        with pytest.raises(BadRequest, match=r"refused the request: .*temperature") as err:
            await client.call("llm", "hello", timeout=30)
    assert len(stub.requests) == 1
    assert "\n" not in err.value.message


async def test_retry_after_header_is_honoured(nats_server, session_id, stub):
    stub.fail(429, "slow down", code="rate_limit_exceeded", **{"Retry-After": "0.6"})
    model = LiteLLMModel("openai/council-stub-model", api_base=stub.api_base, api_key="sk-stub")
    async with serving(nats_server.url, session_id, LLMPeer("llm", model, backoff=0.01)) as client:
        started = time.monotonic()
        assert (await client.call("llm", "x", timeout=30)).value == "echo: x"
        assert time.monotonic() - started >= 0.6
    assert len(stub.requests) == 2


async def test_transient_errors_give_up_after_max_retries(nats_server, session_id):
    attempts = []

    def flaky(messages):
        attempts.append(time.monotonic())
        raise TransientModelError("overloaded")

    peer = LLMPeer("llm", flaky, max_retries=3, backoff=0.02)
    busy = LLMPeer("busy", lambda m: _raise(TransientModelError("busy", retry_after=5)))
    async with serving(nats_server.url, session_id, peer, busy) as client:
        with pytest.raises(Unavailable, match="still failing after 4 attempts"):
            await client.call("llm", "x", timeout=30)
        assert len(attempts) == 4
        # A retry that would outlive the call's deadline is not waited for.
        started = time.monotonic()
        with pytest.raises(Unavailable, match="leaves no time to retry"):
            await client.call("busy", "x", timeout=2)
        assert time.monotonic() - started < 1.5


def _raise(e: BaseException) -> Any:
    raise e


# -- concurrency, events, budget ---------------------------------------------------------------


async def test_concurrency_bound_is_shared_by_peers_of_one_model(nats_server, session_id):
    inflight = peak = 0

    async def slow(messages):
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await anyio.sleep(0.05)
        inflight -= 1
        return "ok"

    model = FunctionModel(slow)
    a, b = LLMPeer("a", model, concurrency=2), LLMPeer("b", model, concurrency=2)
    results: list[str] = []
    async with serving(nats_server.url, session_id, a, b) as client:

        async def one(peer: str) -> None:
            results.append((await client.call(peer, "q", timeout=30)).value)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, "ab"[i % 2])
        elapsed = time.monotonic() - started
    assert results == ["ok"] * 10
    assert peak == 2
    assert elapsed >= 5 * 0.05  # ten calls, two at a time


async def test_completion_event_is_published_per_model_call(nats_server, session_id):
    model = ScriptedModel(["hi!"], usage=(11, 3), cost=0.25)
    async with serving(nats_server.url, session_id, LLMPeer("llm", model)) as client:
        sub = await client.nc.subscribe(subjects.events(session_id, "llm"))
        await client.nc.flush()
        reply = await client.call("llm", "greet me", args={"system": "be nice"}, timeout=10)
        msg = await sub.next_msg(timeout=5)
    event = decode(msg.data)
    assert isinstance(event, Completion)
    assert (event.peer, event.call, event.model, event.response) == (
        "llm",
        reply.id,
        "scripted",
        "hi!",
    )
    assert event.messages == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "greet me"},
    ]
    assert (event.usage.input_tokens, event.usage.output_tokens, event.usage.cost) == (11, 3, 0.25)
    assert event.usage.model_calls == 1
    assert (reply.usage.input_tokens, reply.usage.cost) == (11, 0.25)


async def test_spent_budget_is_refused_without_a_model_call(nats_server, session_id):
    model = ScriptedModel([])
    async with serving(nats_server.url, session_id, LLMPeer("llm", model)) as client:
        call = client.make_call("llm", "q", timeout=10)
        call = call.model_copy(update={"budget": Budget(tokens=0)})
        with pytest.raises(BudgetExhausted, match="budget is already spent"):
            await client.send(call)
    assert model.calls == []


# -- scripted models ---------------------------------------------------------------------------


async def test_scripted_model_misuse_is_a_clear_error(nats_server, session_id):
    model = ScriptedModel(["one", lambda m: f"two after {len(m)}", "three"])
    async with serving(nats_server.url, session_id, LLMPeer("llm", model)) as client:
        assert (await client.call("llm", "a", timeout=10)).value == "one"
        assert (await client.call("llm", "b", timeout=10)).value == "two after 1"
        with pytest.raises(
            ScriptError, match=r"used 2 of 3 replies; the next unused one is 'three'"
        ):
            model.assert_done()
        assert (await client.call("llm", "c", timeout=10)).value == "three"
        with pytest.raises(PeerError) as err:
            await client.call("llm", "one too many", timeout=10)
    assert "has 3 replies but was called a 4th time" in err.value.message
    assert "'one too many'" in err.value.message


async def test_model_specs_and_bad_specs():
    assert isinstance(as_model("gpt-4o-mini"), LiteLLMModel)
    assert isinstance(as_model(["a"]), ScriptedModel)
    assert isinstance(as_model(lambda m: "x"), FunctionModel)
    m = FunctionModel(lambda m: "x")
    assert as_model(m) is m
    with pytest.raises(ModelError, match="litellm model string"):
        as_model(42)
    with pytest.raises(ModelError, match="only apply to a model string"):
        as_model(["a"], api_base="http://x")
    with pytest.raises(ScriptError, match="list of replies"):
        ScriptedModel("just one string")  # type: ignore[arg-type]
    bad = FunctionModel(lambda m: 3)
    with pytest.raises(ScriptError, match="produced a int"):
        await bad.complete([{"role": "user", "content": "q"}])

    async def async_fn(messages, **params):
        return ModelResponse(text=str(params["temperature"]), input_tokens=1, output_tokens=1)

    out = await FunctionModel(async_fn).complete([], temperature=0.5)
    assert out.text == "0.5"


# -- offline -----------------------------------------------------------------------------------

OFFLINE_PROBE = textwrap.dedent(
    """
    import asyncio, ipaddress, json, socket, sys

    attempts = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def loopback(host):
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def connect(self, address):
        if isinstance(address, tuple) and not loopback(address[0]):
            attempts.append(f"connect {address[0]}:{address[1]}")
            raise OSError("network is off in this test")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kw):
        if host is not None and not loopback(host if isinstance(host, str) else host.decode()):
            attempts.append(f"resolve {host}")
            raise socket.gaierror("network is off in this test")
        return real_getaddrinfo(host, *args, **kw)

    socket.socket.connect = connect
    socket.getaddrinfo = getaddrinfo

    import agents.llm, agents.models
    lazy = "litellm" not in sys.modules
    from agents.models import LiteLLMModel

    known = LiteLLMModel("gpt-4o-mini")
    window = known.context_window
    price = known.cost(1000, 100)
    unknown = LiteLLMModel("openai/no-such-model", api_base=sys.argv[1], api_key="sk-stub")
    reply = asyncio.run(unknown.complete([{"role": "user", "content": "offline?"}]))
    print(json.dumps({"lazy": lazy, "window": window, "price": price, "text": reply.text,
                      "cost": reply.cost, "attempts": attempts}))
    """
)


def test_import_and_calls_never_touch_the_network(stub, clean_env, tmp_path):
    """A subprocess with every non-loopback connect refused and recorded, and dead proxies."""
    env = {
        **clean_env,
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)  # agents.models must set it itself
    script = tmp_path / "probe.py"
    script.write_text(OFFLINE_PROBE)
    out = subprocess.run(
        [sys.executable, str(script), stub.api_base],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    assert result["lazy"] is True
    assert result["window"] and result["window"] > 10_000
    assert result["price"] and result["price"] > 0
    assert result["text"] == "echo: offline?" and result["cost"] is None
