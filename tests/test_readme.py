"""The README promises two commands and shows code; CI runs the test command, and the code runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from agents.human import ScriptedHuman
from agents.models import FunctionModel
from council.session import run

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", README)


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.+?)\n```", README, re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    demo, tests = _commands()[:2]
    assert demo.endswith("council demo")
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_readme_bus_example_runs():
    code = _python_block("embedded_server")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "too long: 7 chars"


CHAIR = """
a = critic_a("Find the flaws.", context=context)
b = critic_b("Check the facts.", context=context)
FINAL(ada(f"critic_a: {a}; critic_b: {b}. Accept?"))
"""
CRITIC = """
half = len(context) // 2
notes = llm.map(["Summarise this part."] * 2, contexts=[context[:half], context[half:]])
FINAL(" + ".join(notes))
"""


def scripted(messages: list[dict[str, Any]], **_: Any) -> str:
    """Plays the chair, the critics and the plain LLM, told apart by their system prompts."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    if "ask ada to decide" in system:
        return f"```python\n{CHAIR}\n```"
    if "Find logical flaws" in system or "Check the facts" in system:
        return f"```python\n{CRITIC}\n```"
    return f"summary of {len(messages[-1]['content'])} chars"


def test_readme_council_example_declares_and_runs_with_scripted_models():
    """The README's council, exactly as declared there; only the models are scripted."""
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(_python_block("critic_a"), namespace)
    council = namespace["council"]
    asked: list[str] = []

    def ada(question: Any) -> str:
        asked.append(question.prompt)
        return "Accept, with the flaws fixed."

    result = run(
        council,
        "Review this paper.",
        context="A paper. " * 5_000,
        models={"gpt-4o-mini": FunctionModel(scripted)},
        humans={"ada": ScriptedHuman("ada", ada)},
        timeout=120,
    )
    assert result.value == "Accept, with the flaws fixed."
    assert "critic_a: summary of" in asked[0] and "critic_b: summary of" in asked[0]
    # chair: 1 model call; each critic: 1 of its own and 2 from llm.map.
    assert result.usage.model_calls == 1 + 2 * (1 + 2)


pytest_plugins = ["pytester"]


def test_readme_replayed_test_runs_offline_from_its_cassette(pytester, nats_server, monkeypatch):
    """Record the README's council once (scripted models standing in for the paid ones),
    then run the README's test file as written: it replays, with no model and no key."""
    monkeypatch.setenv("NATS_URL", nats_server.url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pytester.makepyfile(review=_python_block("critic_a"))
    paper = "A paper. " * 5_000
    (pytester.path / "paper.txt").write_text(paper)
    test_file = pytester.makepyfile(test_review=_python_block("council_cassette"))

    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(_python_block("critic_a"), namespace)
    cassette = test_file.parent / "cassettes" / "test_review" / "test_the_chair_asks_ada.jsonl"
    cassette.parent.mkdir(parents=True)
    run(
        namespace["council"],
        "Review this paper.",
        context=paper,
        models={"gpt-4o-mini": FunctionModel(scripted)},
        humans={"ada": ScriptedHuman("ada", ["Accept, with the flaws fixed."])},
        record=cassette,
        timeout=120,
    )
    result = pytester.runpytest_subprocess("-q", "-p", "anyio")
    result.assert_outcomes(passed=1)
