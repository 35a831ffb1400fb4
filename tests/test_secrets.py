"""No credential in any cassette, trace, HTML page or log line, while the model still gets
the real key, and a replay of the masked cassette still matches the live requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from channels import redact
from channels.messages import Call
from council.cassette import Cassette
from council.record import Recorder
from council.replay import Replayer
from tests.test_resume import stubs  # noqa: F401  (fixture)

ROOT = Path(__file__).parent.parent

API_KEY = "sk-proj-Zx81QmW0cN4rT7yLpE2vKd9sHa3fGj6u"
HEADER_TOKEN = "tok_live_5f2b9c1d7e3a4b6c8d0e"
SECRETS = {
    "anthropic": "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz012345",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "github": "ghp_1234567890abcdefghijABCDEFGHIJ123456",
    "slack": "xoxb-2048-4096-AbCdEfGhIjKl",
    "url password": "hunter2pass",
    "bearer": "mF_9.B5f-4.1JqM",
}
PROMPT = (
    f"Use key {SECRETS['anthropic']} and {SECRETS['aws']} / {SECRETS['github']}; post to "
    f"Slack with {SECRETS['slack']}; the db is postgres://bob:{SECRETS['url password']}@db:5432/x "
    f"and the API wants 'Authorization: Bearer {SECRETS['bearer']}'. How many keys is that?"
)
CREDENTIALS = [API_KEY, HEADER_TOKEN, *SECRETS.values()]

COUNCIL = f"""
from council import LLM, Council

council = Council(
    entry="llm",
    peers=[
        LLM(
            "llm",
            model="openai/sub",
            params={{
                "api_key": "{API_KEY}",
                "extra_headers": {{"X-Api-Key": "{HEADER_TOKEN}"}},
            }},
        )
    ],
)
"""


def _leaks(text: str) -> list[str]:
    return [c for c in CREDENTIALS if c in text]


def test_no_credential_in_cassette_trace_page_or_logs_and_the_replay_still_matches(
    tmp_path,
    stubs,  # noqa: F811
):
    stub = stubs(0.0)
    spec = tmp_path / "secret_council.py"
    spec.write_text(COUNCIL)
    cassette = tmp_path / "secret.jsonl"
    env = dict(os.environ)
    env.update(
        OPENAI_API_BASE=stub.url + "/v1",
        OPENAI_BASE_URL=stub.url + "/v1",
        COUNCIL_LOG_LEVEL="debug",  # every log line the session writes
        COUNCIL_LOG_JSON="1",
        COUNCIL_SESSIONS=str(tmp_path / "sessions"),
        PYTHONPATH=str(ROOT),
    )
    env.pop("OPENAI_API_KEY", None)
    cli = [sys.executable, "-m", "council.cli"]
    run = [*cli, "run", f"{spec}:council", "--prompt", PROMPT, "--no-human", "--quiet"]
    done = subprocess.run(
        [*run, "--record", str(cassette)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = done.stdout.strip()
    # the model was called with the real key: masking is for what is written down only
    assert f"Bearer {API_KEY}" in stub.get("/stats")["auth"]
    assert stub.get("/stats")["sub"] == 1

    recorded = cassette.read_text()
    assert _leaks(recorded) == []
    assert redact.MASK in recorded  # masked, not dropped silently
    header = Cassette.load(cassette).header.council
    assert header["peers"][0]["params"]["api_key"] == redact.MASK
    assert header["peers"][0]["params"]["extra_headers"]["X-Api-Key"] == redact.MASK
    # the prompt's secrets are masked, the rest of it kept
    assert "postgres://[MASKED]@db:5432/x" in recorded and "How many keys" in recorded

    page = tmp_path / "secret.html"
    trace = subprocess.run(
        [*cli, "trace", "--all", str(cassette), "--html", str(page)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert trace.returncode == 0, trace.stderr
    assert "llm <- admin" in trace.stdout
    assert _leaks(trace.stdout) == [] and _leaks(trace.stderr) == []
    assert _leaks(page.read_text()) == []

    logs = done.stderr
    assert len([line for line in logs.splitlines() if line.startswith("{")]) > 3  # logs ran
    assert _leaks(logs) == []

    # A replay of the masked cassette with the same (secret-bearing) request matches it:
    # the live request is masked the same way before matching. No model is called.
    again = subprocess.run(
        [*run, "--replay", str(cassette), "--strict"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == answer
    assert stub.get("/stats")["sub"] == 1
    assert _leaks(again.stderr) == []


@pytest.mark.anyio
async def test_values_and_api_base_credentials_are_masked_and_user_patterns_added(
    nats_server, session_id, tmp_path, connect
):
    """A reply carrying a secret, an api_base with a password and a key in its query, and a
    pattern of the user's own: none reaches the cassette; replay matches the masked call."""
    redact.add_pattern(r"ACME-\d{6}")
    try:
        path = tmp_path / "values.jsonl"
        server, client, rb = await connect("vault"), await connect("client"), await connect("rec")

        async def vault(call: Call) -> str:
            return f"the root password is ACME-123456, token ghp_{'a1' * 18}"

        council = {
            "peers": [
                {
                    "name": "vault",
                    "params": {
                        "api_base": "https://svc:p4ssw0rd@llm.internal/v1?api-key=k3y-v4lue",
                        "headers": {"Authorization": "Basic c3ZjOnA0c3N3MHJk"},
                    },
                }
            ]
        }
        async with Recorder(rb.nc, session_id, path, council=council, replay=["vault"]):
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, "vault", vault)
                reply = await client.call("vault", "open with ACME-654321")
                tg.cancel_scope.cancel()
        assert "ACME-123456" in reply.value  # the live answer is untouched
        text = path.read_text()
        for leaked in ("ACME-123456", "ACME-654321", "p4ssw0rd", "k3y-v4lue", "c3ZjOnA0", "ghp_a1"):
            assert leaked not in text, leaked
        params = json.loads(text.splitlines()[0])["council"]["peers"][0]["params"]
        assert params["api_base"] == "https://[MASKED]@llm.internal/v1?api-key=[MASKED]"
        assert params["headers"]["Authorization"] == redact.MASK

        replayer = Replayer(path, ["vault"])
        live = Call(session="s2", caller="client", callee="vault", prompt="open with ACME-654321")
        replayed = await replayer.answer(live)
        assert replayed.value == "the root password is [MASKED], token [MASKED]"
    finally:
        redact.clear_patterns()


def test_masking_is_idempotent_and_leaves_ordinary_text_alone():
    plain = "ask the task-manager about sk-short and max_tokens=5; http://example.com/a?b=c"
    assert redact.text(plain) == "ask the task-manager about sk-short and max_tokens=5; " + (
        "http://example.com/a?b=c"
    )
    once = redact.value({"api_key": "x", "max_tokens": 5, "prompt": PROMPT})
    assert once["max_tokens"] == 5 and once["api_key"] == redact.MASK
    assert redact.value(once) == once
    assert _leaks(json.dumps(once)) == []


@pytest.mark.anyio
async def test_a_value_kept_beside_the_cassette_is_masked_too(tmp_path):
    """A context too big to travel inline goes through the store; the recorder saves its
    contents beside the cassette for replays, masked like everything else."""
    from agents.models import FunctionModel
    from council import LLM, Council, Session
    from council.session import INLINE_CONTEXT_LIMIT

    council = Council(entry="llm", peers=[LLM("llm", model="m")])
    secret = SECRETS["anthropic"]
    big = "a long document. " * (INLINE_CONTEXT_LIMIT // 16) + f"deploy key {secret}"
    path = tmp_path / "big.jsonl"
    seen: list[str] = []

    def model(messages):
        seen.append(json.dumps(messages))
        return "read it"

    async with Session(council, models={"m": FunctionModel(model)}, record=path) as s:
        result = await s.ask("What is the deploy key?", context=big)
    assert result.value == "read it" and secret in seen[0]  # the model read the real value
    cassette = Cassette.load(path)
    assert cassette.footer is not None and cassette.footer.refs  # the value was saved...
    saved = [p.read_bytes() for p in cassette.blobs_dir.iterdir()]
    assert saved and all(secret.encode() not in b for b in saved)  # ...masked
    assert any(b"deploy key [MASKED]" in b for b in saved)
    assert secret not in path.read_text()


@pytest.mark.anyio
async def test_a_trace_masks_a_cassette_recorded_before_masking(
    nats_server, session_id, tmp_path, connect
):
    """Defence in depth: a cassette that holds a credential (an older recorder, a hand edit)
    is still shown masked by `council trace` and its page."""
    from council import trace

    path = tmp_path / "old.jsonl"
    server, client, rb = await connect("echo"), await connect("client"), await connect("rec")

    async def echo(call: Call) -> str:
        return "fine"

    async with Recorder(rb.nc, session_id, path):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "echo", echo)
            await client.call("echo", "PLACEHOLDER")
            tg.cancel_scope.cancel()
    secret = SECRETS["github"]
    path.write_text(path.read_text().replace("PLACEHOLDER", f"use {secret}"))
    assert secret in path.read_text()
    cassette = Cassette.load(path, lenient=True)  # the edit shows as a digest mismatch
    built = trace.build(cassette)
    text = trace.render_text(built)
    assert "echo <- client" in text and "use [MASKED]" in text and secret not in text
    page = trace.render_html(built)
    assert "use [MASKED]" in page and secret not in page
