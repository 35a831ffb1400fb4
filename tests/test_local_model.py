"""A real model, offline: SmolLM2-135M under llama-cpp-python, reached through litellm.

Needs the `local` extra. Without it these tests fail (CI installs it), saying how to
install it, rather than skipping into a green run that proved nothing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from agents.llm import LLMPeer
from agents.local import LocalModelMissing, LocalModelServer, smollm2_path
from channels.errors import BadRequest
from tests.conftest import pid_alive, serving

pytestmark = [pytest.mark.anyio, pytest.mark.local_model]

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["the", "river", "stone", "green", "market", "slowly", "window", "paper", "garden", "blue"]


@pytest.fixture(scope="module")
def local_server() -> Iterator[LocalModelServer]:
    try:
        server = LocalModelServer(n_ctx=4096).start(timeout=180)
    except LocalModelMissing as e:
        pytest.fail(f"the local model is not available: {e}", pytrace=False)
    print(f"\nllama_cpp.server ready in {server.started_in:.2f}s at {server.api_base}")
    yield server
    server.cleanup()


def haystack(needle: int, sentences: int = 160, seed: int = 11) -> str:
    """About 2,100 real tokens of filler sentences with one sentence holding the number."""
    rng = random.Random(seed)
    filler = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(sentences)]
    filler.insert(
        rng.randrange(sentences // 5, sentences * 4 // 5), f"The secret number is {needle}."
    )
    return " ".join(filler)


async def test_peer_extracts_a_number_from_a_2000_token_context(
    local_server, nats_server, session_id
):
    needle = 48213
    peer = LLMPeer("reader", local_server.model())
    async with serving(nats_server.url, session_id, peer) as client:
        ref = await (await client.store()).put(haystack(needle))
        started = time.monotonic()
        reply = await client.call(
            "reader",
            "What is the secret number? Answer with the number only.",
            context=ref,
            args={"max_tokens": 16, "temperature": 0},
            timeout=240,
        )
        elapsed = time.monotonic() - started
    print(f"SmolLM2 answered {reply.value!r} in {elapsed:.1f}s, usage {reply.usage}")
    assert str(needle) in reply.value
    # Real tokens counted by the server; nobody knows SmolLM2's price, so cost is None.
    assert 1_800 <= reply.usage.input_tokens <= 3_000
    assert 1 <= reply.usage.output_tokens <= 16
    assert reply.usage.cost is None and reply.usage.model_calls == 1


async def test_context_over_the_servers_window_is_refused_with_sizes(
    local_server, nats_server, session_id
):
    peer = LLMPeer("reader", local_server.model())
    async with serving(nats_server.url, session_id, peer) as client:
        with pytest.raises(BadRequest, match=r"at most 4,096 tokens") as err:
            await client.call("reader", "What is it?", context=haystack(1, 1_000), timeout=60)
    assert "the context is about" in err.value.message


def test_weights_are_found_through_the_installed_distribution():
    path = smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_server_stops_cleanly_and_dies_with_its_parent(clean_env, tmp_path):
    server = LocalModelServer(n_ctx=512)
    try:
        server.start(timeout=180)
    except LocalModelMissing as e:
        pytest.fail(f"the local model is not available: {e}", pytrace=False)
    pid = server.process.pid
    server.cleanup()
    assert not pid_alive(pid)

    # A parent that is SIGKILLed cannot stop its server: the kernel must.
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, time
            from agents.local import LocalModelServer
            s = LocalModelServer(n_ctx=512).start(timeout=180)
            print(json.dumps({"pid": s.process.pid}), flush=True)
            time.sleep(600)
            """
        )
    )
    env = {**clean_env, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, env=env, cwd=tmp_path, text=True
    )
    try:
        child = json.loads(parent.stdout.readline())["pid"]
        assert pid_alive(child)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)


async def test_smollm2_as_the_root_of_an_rlm_agent_ends_cleanly(
    local_server, nats_server, session_id
):
    """A 135M model writes mostly nonsense code; the agent must still end with a value or a
    typed failure, never a traceback from our side or a hang."""
    from agents.limits import Limits
    from agents.prompt import PeerSpec
    from agents.rlm import RLMAgent
    from channels.errors import CallFailed

    agent = RLMAgent(
        "root",
        calls=[PeerSpec("llm", "reads a piece of text and answers a question about it")],
        limits=Limits(iterations=3, seconds=150),
        model_params={"max_tokens": 160, "temperature": 0},
        repl_options={"exec_timeout": 20},
    )
    peers = (
        agent,
        LLMPeer("root-model", local_server.model()),
        LLMPeer("llm", local_server.model()),
    )
    async with serving(nats_server.url, session_id, *peers) as client:
        with anyio.fail_after(240):
            try:
                reply = await client.call(
                    "root", "What is the secret number?", context=haystack(7), timeout=200
                )
                outcome: object = reply
                assert reply.usage.model_calls >= 1
            except CallFailed as e:
                outcome = e
                assert e.kind in ("budget_exhausted", "timeout", "peer_error", "bad_request")
                assert "Traceback" not in e.message
    print(f"\nSmolLM2 as root: {outcome!r}"[:500])
