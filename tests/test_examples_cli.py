"""Every example council runs from the CLI, offline, as a new user would type it.

`council run examples/EX.py --models examples/EX.py:scripted` gives the declaration's
placeholder model strings real model objects (the scripted driver as the root, a
stand-in reader); `...:drivers` leaves the reader (`local/smollm2`) to SmolLM2, which the
CLI starts itself. Each run is a real `council` subprocess with its own nats-server and
REPL workers; the answer must be the right one, not merely an exit code of 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from council.declare import load_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COUNCIL = [sys.executable, "-m", "council.cli"]


def council(*argv: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        env.pop(key, None)
    return subprocess.run(
        [*COUNCIL, *argv],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_example(name: str, models: str, *argv: str, stdin: str = "") -> str:
    done = council(
        "run",
        f"examples/{name}.py",
        "--models",
        f"examples/{name}.py:{models}",
        "--no-record",
        *argv,
        stdin=stdin,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def haystack(tmp_path_factory) -> tuple[Path, str]:
    text, secret = load_file(EXAMPLES / "needle.py").haystack(20_000)
    path = tmp_path_factory.mktemp("needle") / "haystack.txt"
    path.write_text(text)
    return path, secret


@pytest.mark.parametrize("name", ["needle", "distributed"])
def test_needle_and_distributed_find_the_code(name, haystack):
    path, secret = haystack
    module = load_file(EXAMPLES / f"{name}.py")
    out = run_example(name, "scripted", "--context", str(path), "-p", module.QUESTION)
    assert out.strip() == secret


def test_review_catches_the_numbers_and_asks_the_human(tmp_path):
    review = load_file(EXAMPLES / "review.py")
    doc = tmp_path / "proposal.md"
    doc.write_text(review.document())
    # ada is the only human: `council run` asks her on the terminal (here, stdin).
    out = run_example(
        "review",
        "scripted",
        "--context",
        str(doc),
        "-p",
        review.REQUEST,
        stdin="No: fix the latency figures first.\n",
    )
    value = json.loads(out)
    assert review.Outcome(value, "", 0).ok, value
    assert value["human"] == "No: fix the latency figures first." and value["publish"] is False


def test_conversation_acknowledges_a_statement_and_answers_a_question():
    conversation = load_file(EXAMPLES / "conversation.py")
    statement = conversation.TURNS[0][0]
    assert run_example("conversation", "scripted", "-p", statement).strip() == "Noted."
    # Outside a conversation there is no history: the agent says so rather than failing.
    out = run_example("conversation", "scripted", "-p", "What is my flight number?")
    assert out.strip() == "Nothing relevant was said."


def test_show_flags_models_that_cannot_run_here():
    done = council("show", "examples/review.py")
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "model 'scripted/driver' cannot run here: not a model litellm knows" in done.stderr
    assert "chair" in done.stdout  # the declaration is still shown
    # With the scripted models supplied, every model string can run.
    done = council("show", "examples/review.py", "--models", "examples/review.py:drivers")
    assert done.returncode == 0 and "cannot run here" not in done.stderr, done.stderr
    done = council("show", "examples/review.py", "--models", "examples/review.py:scripted")
    assert "cannot run here" not in done.stderr, done.stderr


def test_models_pointing_at_nothing_is_a_clear_error_not_a_traceback():
    done = council("show", "examples/needle.py", "--models", "examples/needle.py:nothing")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "has no attribute 'nothing'" in done.stderr


@pytest.mark.local_model
def test_needle_from_the_cli_with_smollm2_as_the_reader(haystack):
    """`local/smollm2` not covered by --models: the CLI serves it with SmolLM2, offline."""
    path, secret = haystack
    needle = load_file(EXAMPLES / "needle.py")
    out = run_example("needle", "drivers", "--context", str(path), "-p", needle.QUESTION)
    assert out.strip() == secret


@pytest.mark.local_model
def test_model_local_runs_every_model_of_a_council_on_smollm2(tmp_path):
    """`--model local`: each model string becomes `local`, which `council run` serves with
    SmolLM2 itself (no network, no key). An LLM peer as the entry: it answers the prompt."""
    (tmp_path / "ask.py").write_text(
        "from council.declare import LLM, Council\n"
        "council = Council(entry='reader', peers=[LLM('reader', model='openai/gpt-4o-mini')])\n"
    )
    done = council(
        "run",
        str(tmp_path / "ask.py"),
        "--model",
        "local",
        "--no-record",
        "-p",
        "What is the capital of France? Answer in one word.",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), done.stderr[-2000:]
    assert "OPENAI_API_KEY" not in done.stderr
