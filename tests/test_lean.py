"""The lean model path against litellm's full path, on a scripted HTTP server per provider.

Each test runs the same request twice, once on the lean path (`LiteLLMModel(...)`, the
default) and once on litellm's own (`lean=False`, i.e. `litellm.acompletion`), against a
real HTTP server on loopback that speaks the provider's dialect (OpenAI chat completions or
Anthropic messages), and checks that both paths send the same request and come back with
the same text, tokens, cost, and the same litellm exception class, retry hint and peer
classification for each failure.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.llm import LLMPeer
from agents.models import LiteLLMModel, classify, litellm, retry_after
from tests.conftest import serving
from tests.scripted_http import ScriptedHTTP, ServerProcess, server_process

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scripted() -> Iterator[ScriptedHTTP]:
    with ScriptedHTTP() as server:
        yield server


# provider -> (model string, dialect, the api_base to give, price known to litellm)
PROVIDERS = {
    "openai": ("openai/gpt-4o-mini", "openai", "/v1"),
    "hosted_vllm": ("hosted_vllm/my-llama", "openai", "/v1"),
    "lm_studio": ("lm_studio/qwen-local", "openai", "/v1"),
    "openai_like": ("openai_like/some-model", "openai", "/v1"),
    "anthropic": ("anthropic/claude-haiku-4-5-20251001", "anthropic", ""),
}


# litellm 1.110 has a chat config for `openai_like/` but no chat route: its own path refuses
# the model (LiteLLMUnknownProvider, checked below). The lean path serves it with that config;
# its reference is litellm's path for the same server as a `hosted_vllm/` model.
REFERENCE = {"openai_like/some-model": "hosted_vllm/some-model"}


def both(model: str, base: str, **kwargs: Any) -> tuple[LiteLLMModel, LiteLLMModel]:
    """The model on the lean path, and on litellm's full path (or its reference there)."""
    lean = LiteLLMModel(model, api_base=base, api_key="sk-stub", **kwargs)
    full = LiteLLMModel(
        REFERENCE.get(model, model), api_base=base, api_key="sk-stub", lean=False, **kwargs
    )
    assert (lean.path, full.path) == ("lean", "litellm")
    return lean, full


async def test_openai_like_has_no_chat_route_in_litellm_itself():
    model = LiteLLMModel("openai_like/some-model", api_base="http://127.0.0.1:9/v1", lean=False)
    with pytest.raises(litellm().LiteLLMUnknownProvider):
        await model.complete(ASK)


def _without_transport(headers: dict[str, str]) -> dict[str, str]:
    """The headers a provider reads; transport ones (user agent, encoding, length) differ."""
    skip = {"user-agent", "accept", "accept-encoding", "content-length", "host", "connection"}
    return {k: v for k, v in headers.items() if k not in skip}


ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_same_request_text_tokens_and_cost_on_both_paths(provider):
    model, dialect, suffix = PROVIDERS[provider]
    with ScriptedHTTP() as server:
        lean, full = both(model, server.url + suffix, extra_headers={"X-Council": "yes"})
        params = {"max_tokens": 50, "temperature": 0.2, "stop": ["\n\n"]}
        try:
            got_lean = await lean.complete(ASK, **params)
            got_full = await full.complete(ASK, **params)
        finally:
            await lean.aclose()
    assert got_lean == got_full
    assert got_lean.text == "echo: hello there"
    assert (got_lean.input_tokens, got_lean.output_tokens) == (1200, 80)
    (path_l, head_l, body_l), (path_f, head_f, body_f) = server.requests
    assert body_l == body_f and path_l == path_f
    assert _without_transport(head_l) == _without_transport(head_f)
    assert head_l["x-council"] == "yes"
    if dialect == "anthropic":
        assert path_l == "/v1/messages" and head_l["x-api-key"] == "sk-stub"
        assert body_l["system"] and body_l["max_tokens"] == 50
    else:
        assert path_l == "/v1/chat/completions"
        assert head_l["authorization"] == "Bearer sk-stub"
    if provider in ("openai", "anthropic"):  # models in litellm's price table
        info = litellm().get_model_info(model)
        price = 1200 * info["input_cost_per_token"] + 80 * info["output_cost_per_token"]
        assert got_lean.cost == pytest.approx(price) and got_lean.cost > 0
    else:
        assert got_lean.cost is None


async def test_custom_price_is_the_same_on_both_paths(scripted):
    prices = {"input_cost_per_token": 2e-6, "output_cost_per_token": 5e-6}
    lean, full = both("hosted_vllm/priced-llama", scripted.url + "/v1", **prices)
    a = await lean.complete(ASK)
    b = await full.complete(ASK)
    await lean.aclose()
    assert a.cost == b.cost == pytest.approx(1200 * 2e-6 + 80 * 5e-6)


# (status, message, kind, headers) for each failure a provider can answer with
FAILURES = {
    "rate_limited": (
        429,
        "Rate limit reached for requests",
        "rate_limit_error",
        {"Retry-After": "7"},
    ),
    "overloaded": (503, "The server is overloaded", "overloaded_error", {}),
    "internal": (500, "Internal error", "api_error", {}),
    "too_long": (
        400,
        "This model's maximum context length is 4096 tokens. However, your messages "
        "resulted in 9000 tokens. Please reduce the length of the messages. "
        "prompt is too long: 9000 tokens > 4096 maximum",
        "context_length_exceeded",
        {},
    ),
    "bad_key": (401, "Incorrect API key provided", "authentication_error", {}),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("failure", list(FAILURES))
async def test_failures_are_the_same_litellm_errors_on_both_paths(provider, failure):
    model, _, suffix = PROVIDERS[provider]
    status, message, kind, headers = FAILURES[failure]
    errors = []
    with ScriptedHTTP() as server:
        for m in both(model, server.url + suffix):
            server.fail(status, message, kind, code=kind, **headers)
            try:
                with pytest.raises(Exception) as caught:
                    await m.complete(ASK)
            finally:
                await m.aclose()
            errors.append(caught.value)
    lean_error, full_error = errors
    assert type(lean_error) is type(full_error)
    assert type(lean_error).__module__.startswith("litellm")
    assert classify(lean_error) == classify(full_error)
    assert retry_after(lean_error) == retry_after(full_error)
    assert getattr(lean_error, "status_code", None) == getattr(full_error, "status_code", None)
    expected = {
        "rate_limited": "transient",
        "overloaded": "transient",
        "internal": "transient",
        "too_long": "too_large",
        "bad_key": "fatal",
    }[failure]
    assert classify(lean_error) == expected
    if failure == "rate_limited":
        assert retry_after(lean_error) == 7.0
    assert message.split(".")[0] in str(lean_error)


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_refused_connection_is_the_same_error_on_both_paths(provider):
    model, _, suffix = PROVIDERS[provider]
    base = f"http://127.0.0.1:{_refused_port()}{suffix}"
    errors = []
    for m in both(model, base):
        with pytest.raises(Exception) as caught:
            await m.complete(ASK)
        errors.append(caught.value)
    lean_error, full_error = errors
    assert type(lean_error) is type(full_error)
    assert classify(lean_error) == classify(full_error) == "transient"


# -- keys, bases, headers from the environment ---------------------------------------------


@pytest.mark.parametrize(
    ("model", "env", "auth"),
    [
        (
            "openai/gpt-4o-mini",
            {"OPENAI_BASE_URL": "{url}/v1", "OPENAI_API_KEY": "sk-env"},
            "bearer",
        ),
        (
            "hosted_vllm/m",
            {"HOSTED_VLLM_API_BASE": "{url}/v1", "HOSTED_VLLM_API_KEY": "sk-env"},
            "bearer",
        ),
        (
            "lm_studio/m",
            {"LM_STUDIO_API_BASE": "{url}/v1", "LM_STUDIO_API_KEY": "sk-env"},
            "bearer",
        ),
        (
            "anthropic/claude-haiku-4-5-20251001",
            {"ANTHROPIC_API_BASE": "{url}", "ANTHROPIC_API_KEY": "sk-env"},
            "x-api-key",
        ),
    ],
)
async def test_keys_and_bases_come_from_the_providers_environment(monkeypatch, model, env, auth):
    with ScriptedHTTP() as server:
        for k, v in env.items():
            monkeypatch.setenv(k, v.format(url=server.url))
        lean = LiteLLMModel(model)
        full = LiteLLMModel(model, lean=False)
        assert lean.path == "lean"
        a, b = await lean.complete(ASK), await full.complete(ASK)
        await lean.aclose()
    assert a.text == b.text == "echo: hello there"
    (_, head_l, body_l), (_, head_f, body_f) = server.requests
    assert body_l == body_f
    if auth == "bearer":
        assert head_l["authorization"] == head_f["authorization"] == "Bearer sk-env"
    else:
        assert head_l["x-api-key"] == head_f["x-api-key"] == "sk-env"


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_response_format_goes_through_the_providers_mapping(scripted, dialect):
    """Typed outputs send a JSON schema; each provider's config maps it as litellm would."""
    schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "Answer",
            "schema": {
                "type": "object",
                "properties": {"n": {"type": "integer"}},
                "required": ["n"],
            },
        },
    }
    if dialect == "anthropic":
        model, base = "anthropic/claude-haiku-4-5-20251001", scripted.url
    else:
        model, base = "hosted_vllm/m", scripted.url + "/v1"
    lean, full = both(model, base)
    for m in (lean, full):
        await m.complete(ASK, response_format=schema)
    await lean.aclose()
    (_, _, body_l), (_, _, body_f) = scripted.requests
    assert body_l == body_f
    if dialect == "openai":
        assert body_l["response_format"] == schema
    else:  # Anthropic has no response_format: litellm sends it as its structured-output form
        assert body_l != {k: v for k, v in body_l.items() if k not in ("tools", "output_format")}


# -- when the lean path steps aside ----------------------------------------------------------


async def test_callbacks_send_calls_through_litellm(scripted):
    from litellm.integrations.custom_logger import CustomLogger

    seen: list[Any] = []

    class Seen(CustomLogger):
        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            seen.append(kwargs.get("response_cost"))

    model = LiteLLMModel("openai/gpt-4o-mini", api_base=scripted.url + "/v1", api_key="sk-stub")
    lib = litellm()
    assert model.path == "lean"
    assert model._route.why_not({}) is None
    logger = Seen()
    lib.callbacks.append(logger)
    try:
        assert "litellm.callbacks" in model._route.why_not({})
        reply = await model.complete(ASK)
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.05)
    finally:  # litellm copies a callback into its other lists as it meets it
        for attr in (
            "callbacks",
            "success_callback",
            "_async_success_callback",
            "failure_callback",
            "_async_failure_callback",
            "input_callback",
            "_async_input_callback",
            "service_callback",
        ):
            listed = getattr(lib, attr, None)
            while isinstance(listed, list) and logger in listed:
                listed.remove(logger)
    assert model._route.why_not({}) is None
    assert reply.text == "echo: hello there"
    assert seen and seen[0] == pytest.approx(reply.cost)  # litellm's own logging saw the call


async def test_options_only_litellm_knows_take_its_path(scripted):
    odd = LiteLLMModel("hosted_vllm/m", api_base=scripted.url + "/v1", mock_response="canned")
    assert odd.path == "litellm"
    assert (await odd.complete(ASK)).text == "canned"
    assert scripted.requests == []
    sdk = LiteLLMModel("bedrock/anthropic.claude-3-haiku-20240307-v1:0")
    assert sdk.path == "litellm"  # signed requests: not a provider of the lean path


PATH_PROBE = """
import sys
from agents.models import LiteLLMModel
LiteLLMModel("hosted_vllm/m", api_base=sys.argv[1]).path
LiteLLMModel("hosted_vllm/m", api_base=sys.argv[1], lean=False).path
LiteLLMModel("bedrock/anthropic.claude-3-haiku-20240307-v1:0").path
"""


def test_the_path_each_model_takes_is_a_debug_event(scripted, clean_env, tmp_path):
    env = {**clean_env, "COUNCIL_LOG_LEVEL": "debug", "COUNCIL_LOG_JSON": "1"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PATH_PROBE, scripted.url + "/v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    paths = [(e["model"], e["path"], e.get("reason")) for e in events if e["event"] == "llm.path"]
    assert paths[0] == ("hosted_vllm/m", "lean", None)
    assert paths[1] == ("hosted_vllm/m", "litellm", "lean=False")
    assert paths[2][1] == "litellm" and "'bedrock' is not on the lean path" in paths[2][2]


# -- the session -------------------------------------------------------------------------------


async def test_one_session_per_model_reused_and_closed_when_the_peer_stops(
    nats_server, session_id, scripted
):
    model = LiteLLMModel("hosted_vllm/m", api_base=scripted.url + "/v1", api_key="sk-stub")
    peer = LLMPeer("llm", model)
    async with serving(nats_server.url, session_id, peer) as client:
        replies = await asyncio.gather(
            *(client.call("llm", f"q{i}", timeout=30) for i in range(20))
        )
        sessions = list(model._route._sessions.values())
        assert len(sessions) == 1 and not sessions[0].closed
    assert [r.value for r in replies] == [f"echo: q{i}" for i in range(20)]
    assert all(r.usage.input_tokens == 1200 for r in replies)
    assert sessions[0].closed  # the peer closed it when it stopped
    assert not model._route._sessions
    gc.collect()


# -- proxies, as litellm takes them from the environment -------------------------------------


async def test_a_proxy_from_the_environment_is_used_on_both_paths(scripted, monkeypatch):
    """HTTP_PROXY is honoured (and looked up once, not per request in a thread)."""
    monkeypatch.setenv("HTTP_PROXY", scripted.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    upstream = "http://upstream.invalid:8080/v1"
    lean, full = both("hosted_vllm/m", upstream)
    try:
        assert lean._route.proxy == scripted.url
        a, b = await lean.complete(ASK), await full.complete(ASK)
    finally:
        await lean.aclose()
    assert a == b and a.text == "echo: hello there"
    # A proxy is sent the absolute URL: both requests went through it to the upstream.
    assert [path for path, _, _ in scripted.requests] == [f"{upstream}/chat/completions"] * 2


# -- no full garbage collection inside a fan-out ----------------------------------------------


@pytest.fixture
def openai_stub() -> Iterator[ServerProcess]:
    """benchmarks/openai_stub.py: an asyncio OpenAI-compatible server that counts what it served."""
    with server_process(sys.executable, str(ROOT / "benchmarks" / "openai_stub.py")) as stub:
        yield stub


async def test_no_full_collection_inside_a_5000_call_fan_out(nats_server, session_id, openai_stub):
    """5,000 calls through the bus to a litellm model on the lean path, 64 in flight.

    The LLM peer collects and freezes the heap once litellm is loaded (`freeze_heap`);
    without that, litellm's ~370k tracked objects made full collections of about 250 ms
    land inside fan-outs like this one.
    """
    n = 5000
    model = LiteLLMModel(
        "openai/sub",
        api_base=f"{openai_stub.url}/floor/{n}/gc-{session_id}/v1",
        api_key="stub",
        input_cost_per_token=1e-7,
        output_cost_per_token=4e-7,
    )
    full: list[float] = []  # the duration of each full collection seen, in ms

    def watch(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            full.append(-time.perf_counter())
        else:
            full[-1] = round((full[-1] + time.perf_counter()) * 1000, 1)

    peer = LLMPeer("llm", model, concurrency=16, serve_concurrency=64)
    async with serving(nats_server.url, session_id, peer) as client:
        assert model.path == "lean"
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> str:
            async with sem:
                return (await client.call("llm", f"SUB {i}", timeout=120)).value

        gc.callbacks.append(watch)
        try:
            answers = await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            gc.callbacks.remove(watch)
    assert answers == ["ok done"] * n
    assert (await asyncio.to_thread(openai_stub.get, f"/stats/gc-{session_id}"))["sub"] == n
    assert full == [], f"full collections inside the fan-out, ms each: {full}"
