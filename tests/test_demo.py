"""`council demo`, as a person runs it after the README's set-up: a real subprocess.

Three ways in: with SmolLM2 (the `local` extra, installed here and on CI), from the
bundled cassettes on request, and from them because the extra is missing (simulated by
hiding llama_cpp from the process, as on a machine that installed only `.[dev]`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from council import demo

ROOT = Path(__file__).resolve().parent.parent
HIDE_LOCAL_EXTRA = (
    "import sys; sys.modules['llama_cpp'] = None; "  # find_spec now says: not installed
    "from council.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _demo(argv: list[str], clean_env: dict[str, str], *, timeout: float, env: dict | None = None):
    started = time.monotonic()
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**clean_env, "COUNCIL_LOG_LEVEL": "warning", **(env or {})},
        cwd=ROOT,
        timeout=timeout,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # the last line is JSON
    return done.stdout, summary, elapsed


def _check_trees(out: str) -> None:
    assert "== the call trees, from the sessions' recordings" in out
    trees = out.split("== the call trees")[1]
    assert "─ finder <- admin" in trees and "reader <- finder-repl" in trees
    assert "─ chair <- admin" in trees and "ada <- chair-repl" in trees
    assert "numbers <- chair-repl" in trees and "clarity <- chair-repl" in trees


def _check_answers(summary: dict) -> None:
    assert (
        summary["needle"]["found"] and summary["needle"]["answer"] == summary["needle"]["expected"]
    )
    assert summary["needle"]["largest_root_prompt_chars"] < 5_000
    assert summary["review"]["ok"]


def test_demo_replays_the_bundled_cassettes_when_asked(clean_env):
    out, summary, elapsed = _demo(
        [sys.executable, "-m", "council.cli", "demo", "--replay"], clean_env, timeout=120
    )
    assert "Replaying the bundled cassettes" in out and "(asked for)" in out
    assert "started the embedded nats-server" in out
    assert summary["source"] == "cassette"
    _check_answers(summary)
    _check_trees(out)
    print(f"\ncouncil demo --replay: {elapsed:.1f}s")


def test_demo_without_the_local_extra_says_so_and_replays(clean_env):
    out, summary, _ = _demo(
        [sys.executable, "-c", HIDE_LOCAL_EXTRA, "demo"], clean_env, timeout=120
    )
    assert "the local model is not available (llama-cpp-python is not installed" in out
    assert summary["source"] == "cassette"
    _check_answers(summary)


def test_the_environment_can_force_the_cassettes(monkeypatch):
    monkeypatch.setenv(demo.REPLAY_ENV, "1")
    assert demo.wants_replay(False)
    monkeypatch.setenv(demo.REPLAY_ENV, "0")
    assert not demo.wants_replay(False) and demo.wants_replay(True)


@pytest.mark.local_model
def test_demo_runs_live_on_smollm2(clean_env):
    if (why := demo.local_model_missing()) is not None:
        pytest.fail(f"the local model is not available: {why}", pytrace=False)
    out, summary, elapsed = _demo(
        [sys.executable, "-m", "council.cli", "demo"], clean_env, timeout=300
    )
    assert "Sub-LLM: SmolLM2-135M" in out and "scripted driver" in out
    assert "SmolLM2 is serving at http://127.0.0.1:" in out
    assert summary["source"] == "smollm2"
    assert summary["needle"]["tokens"] >= 1_000_000  # a million tokens, a small prompt
    _check_answers(summary)
    _check_trees(out)
    assert "[smollm2]" in out  # live calls carry the model that answered them
    print(f"\ncouncil demo on SmolLM2: {elapsed:.1f}s")
