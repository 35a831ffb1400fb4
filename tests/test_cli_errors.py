"""A user's mistake on the command line gets one clear line and exit code 2, never a traceback.

Each case runs the real `council` command in a subprocess (a real nats-server where one is
needed) and checks what the user sees: the exit code, that stderr is one line naming the
cause, and that no Python traceback or JSON log line leaks out.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from channels.server import running_server

ROOT = Path(__file__).resolve().parent.parent
COUNCIL = "examples/conversation.py"  # two peers: assistant, reader
CLI = [sys.executable, "-m", "council.cli"]


def _council(
    *argv: str, env: dict[str, str], timeout: float = 60, **kw
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *argv],
        cwd=kw.pop("cwd", ROOT),
        env={**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _one_clear_line(done: subprocess.CompletedProcess, command: str, *said: str) -> str:
    """Exit code 2, and stderr is exactly one line `council COMMAND: ...` holding `said`."""
    err = done.stderr
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert done.returncode == 2, (done.returncode, err)
    assert lines[0].startswith(f"council {command}: "), err
    for part in said:
        assert part in lines[0], (part, err)
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_show_a_function_that_needs_arguments(clean_env):
    done = _council("show", "examples/review.py:script", env=clean_env)
    _one_clear_line(done, "show", "examples/review.py:script", "needs arguments", "Council")


def test_show_a_function_that_fails_when_called(clean_env, tmp_path):
    src = tmp_path / "broken.py"
    src.write_text("def council():\n    raise RuntimeError('no model configured')\n")
    done = _council("show", f"{src}:council", env=clean_env)
    _one_clear_line(done, "show", "raised RuntimeError: no model configured")


def test_run_with_a_local_peer_that_is_not_in_the_council(clean_env):
    done = _council("run", COUNCIL, "--local", "nobody", "-p", "hi", "--no-record", env=clean_env)
    _one_clear_line(done, "run", "no peer 'nobody'", "assistant, reader")


def test_serve_a_peer_that_is_not_in_the_council(clean_env, nats_server):
    done = _council(
        "serve", COUNCIL, "--peer", "nobody", "--session", "s1", "--nats", nats_server.url,
        env=clean_env,
    )  # fmt: skip
    _one_clear_line(done, "serve", "no peer 'nobody'", "assistant, reader")


@pytest.mark.parametrize("command", ["run", "serve", "human", "rights"])
def test_a_session_name_nats_cannot_carry(clean_env, nats_server, command, tmp_path):
    argv = {
        "run": ["run", COUNCIL, "-p", "hi", "--no-record"],
        "serve": ["serve", COUNCIL, "--peer", "reader", "--nats", nats_server.url],
        "human": ["human", "--name", "ada", "--nats", nats_server.url],
        "rights": ["rights", COUNCIL, "--out", str(tmp_path / "rights")],
    }[command]
    done = _council(*argv, "--session", "review.1", env=clean_env)
    _one_clear_line(done, command, "session 'review.1'", "'.'")


@pytest.mark.parametrize(
    "argv",
    [
        ["trace", "--all", "examples/cassettes/review.jsonl"],
        ["show", "examples/review.py", "--json"],
    ],
)
def test_output_into_a_closed_pipe_stops_quietly(clean_env, argv):
    """`council trace x | head`: the reader has gone; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # a reader that is already gone: the first write fails, every time
    try:
        done = subprocess.run(
            [*CLI, *argv],
            cwd=ROOT,
            env={**clean_env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.stderr == "", done.stderr
    assert done.returncode == 141  # as a shell reports a process ended by SIGPIPE


def test_serve_where_no_server_listens_says_refused(clean_env):
    url = f"nats://127.0.0.1:{_free_port()}"
    done = _council(
        "serve", COUNCIL, "--peer", "reader", "--session", "s1", "--nats", url, env=clean_env
    )
    line = _one_clear_line(done, "serve", f"cannot connect to NATS at {url}: connection refused")
    assert "--nats" in line  # what to do next


def test_serve_with_a_wrong_password_names_the_authorization_violation(clean_env):
    with running_server(config_extra="authorization { user: bob, password: right }") as srv:
        done = _council(
            "serve", COUNCIL, "--peer", "reader", "--session", "s1", "--nats", srv.url,
            "--user", "bob", "--password", "wrong",
            env=clean_env,
        )  # fmt: skip
        line = _one_clear_line(done, "serve", f"cannot connect to NATS at {srv.url}: ")
        assert "Authorization Violation" in line and "--password" in line
        assert "wrong" not in line  # the password is never echoed
        # and a right password gets past connecting (served until we stop it)
        ok = subprocess.Popen(
            [*CLI, "serve", COUNCIL, "--peer", "reader", "--session", "s1", "--nats", srv.url,
             "--user", "bob", "--password", "right"],
            cwd=ROOT,
            env={**clean_env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert "serving 'reader'" in ok.stdout.readline()
        finally:
            ok.terminate()
            ok.wait(30)


@pytest.mark.parametrize("command", ["human", "run"])
def test_human_and_run_with_a_wrong_password_name_the_authorization_violation(clean_env, command):
    with running_server(config_extra="authorization { user: bob, password: right }") as srv:
        argv = {
            "human": ["human", "--name", "ada"],
            "run": ["run", COUNCIL, "-p", "hi", "--no-record"],
        }[command]
        done = _council(
            *argv, "--session", "s1", "--nats", srv.url, "--user", "bob", "--password", "wrong",
            env=clean_env,
        )  # fmt: skip
        _one_clear_line(done, command, "Authorization Violation", "--password")


def test_serve_on_an_unroutable_address_says_unreachable(clean_env):
    """10.255.255.1 is never answered: either the kernel says unreachable, or nothing comes."""
    url = "nats://10.255.255.1:4222"
    done = _council(
        "serve", COUNCIL, "--peer", "reader", "--session", "s1", "--nats", url, env=clean_env
    )
    line = _one_clear_line(done, "serve", f"cannot connect to NATS at {url}: ")
    assert "unreachable" in line.lower() or "no route" in line.lower(), line


def test_a_model_without_its_api_key_says_which_key_at_once(clean_env, tmp_path):
    """No OPENAI_API_KEY (and no network): the run names the key, instead of retrying for
    tens of seconds and then advising to try again later."""
    env = {k: v for k, v in clean_env.items() if k != "OPENAI_API_KEY"}
    done = _council(
        "run", str(ROOT / COUNCIL), "--model", "gpt-4o-mini", "-p", "hi", "--no-record",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("council run: ")]
    assert "gpt-4o-mini needs OPENAI_API_KEY, which is not set" in line, done.stderr
    assert "try again later" not in done.stderr and "llm.retry" not in done.stderr


@pytest.mark.anyio
async def test_the_key_check_leaves_models_with_a_key_or_no_key_alone(monkeypatch):
    """An `api_key` given, or a provider whose only missing setting is not a key (ollama's
    API base has a default), is not refused by the check."""
    from agents.models import LiteLLMModel, MissingKey

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    keyless = LiteLLMModel("gpt-4o-mini")
    with pytest.raises(MissingKey, match="OPENAI_API_KEY"):
        await keyless.complete([{"role": "user", "content": "hi"}])
    for model in (LiteLLMModel("gpt-4o-mini", api_key="sk-given"), LiteLLMModel("ollama/x")):
        await model.prepare()
        assert model._missing_key is None, model
