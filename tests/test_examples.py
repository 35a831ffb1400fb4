"""The examples, replayed from their committed cassettes through their own code.

Each replay runs the example's real agents and REPL code against a real nats-server;
only the model and human answers come from the recording (made offline with SmolLM2),
strictly: a request the recording lacks, or one it holds that the run never makes,
fails the test. One test runs the needle example live at two sizes to show that the
root prompt does not grow with the input.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import ModuleType

import pytest

from council.cli import main
from council.declare import load_file

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_CASSETTE_BYTES = 1_000_000


def example(name: str) -> ModuleType:
    return load_file(EXAMPLES / f"{name}.py")


def replaying(module: ModuleType, *extra: str):
    return module.options(["--replay", str(module.CASSETTE), "--strict", *extra])


async def test_needle_finds_the_code_without_the_text_in_any_root_prompt(capsys):
    needle = example("needle")
    text, secret = needle.haystack(needle.CASSETTE_TOKENS)
    out = io.StringIO()
    outcome = await needle.run(replaying(needle), out=out)
    assert outcome.found and outcome.value == secret
    turns = re.findall(r"turn (\d+): the root prompt is ([\d,]+) characters", out.getvalue())
    assert [t for t, _ in turns] == ["1", "2", "3"]
    assert max(int(c.replace(",", "")) for _, c in turns) == outcome.largest_prompt
    assert outcome.largest_prompt < len(text) / 20  # the 80 KB text never went in
    assert f"answer: '{secret}'" in capsys.readouterr().out


async def test_needle_root_prompt_is_the_same_size_at_10k_and_2m_tokens():
    """Live, with the scripted driver and a stand-in reader that answers from its window
    (SmolLM2 takes seconds a call; the replay test above covers the real one)."""
    needle = example("needle")
    shared = __import__("_shared")
    from agents.models import FunctionModel

    def reader(messages):
        found = re.search(r"\b\d{5}\b", messages[-1]["content"])
        return f"The secret code for the vault is {found.group() if found else '1234567'}."

    largest = {}
    for tokens in (10_000, 2_000_000):
        args = needle.options(["--tokens", str(tokens), "--quiet"])
        models = shared.Models(
            needle.council,
            {shared.DRIVER: shared.driver(needle.script), shared.LOCAL: FunctionModel(reader)},
            "scripted",
        )
        outcome = await needle.run(args, out=io.StringIO(), models=models)
        assert outcome.found and outcome.tokens >= tokens * 0.99, outcome
        largest[tokens] = outcome.largest_prompt
    # 200x the input, the same prompt give or take the digits of a length it printed
    assert abs(largest[2_000_000] - largest[10_000]) < 50, largest


async def test_review_council_catches_the_numbers_and_asks_the_human():
    review = example("review")
    out = io.StringIO()
    outcome = await review.run(replaying(review), out=out)
    v = outcome.value
    assert outcome.ok, v
    assert v["numbers"]["figures"] == {"Summary": 40, "Results": 90}
    assert not v["numbers"]["consistent"]
    assert v["human"] == review.HUMAN_ANSWER and not v["publish"]
    assert {c["words"] for c in v["clarity"]} == {len(s.split()) for s in review.LONG_SENTENCES}
    for agent in ("chair", "numbers", "clarity"):  # each agent's own root prompts, seen
        assert f"[{agent}] turn 2" in out.getvalue()


async def test_review_document_travels_by_reference_and_the_chair_never_loads_it():
    review = example("review")
    code = review.CHAIR_1 + review.CHAIR_2 + review.CHAIR_3
    import ast

    from agents.repl.runner import needs_context

    assert not needs_context(ast.parse(code), {"numbers", "clarity", "ada"})


async def test_conversation_answers_late_questions_from_early_turns():
    conversation = example("conversation")
    outcome = await conversation.run(replaying(conversation), out=io.StringIO())
    assert outcome.ok, [(e.request, e.answer) for e in outcome.exchanges]
    assert len(outcome.exchanges) == len(conversation.TURNS)
    questions = [e for e in outcome.exchanges if e.needs]
    assert len(questions) == 4 and all(e.ok for e in questions)
    # The memory is a variable: turn 14's prompt is no bigger than turn 2's.
    sizes = [e.prompt_chars for e in outcome.exchanges[1:]]
    assert max(sizes) - min(sizes) < 100, sizes


async def test_distributed_gives_the_same_answer_across_processes(capsys):
    distributed = example("distributed")
    outcome = await distributed.run(replaying(distributed), out=io.StringIO())
    _, secret = example("needle").haystack(distributed.CASSETTE_TOKENS)
    assert outcome.in_process == outcome.distributed == secret
    assert outcome.remote == ["scan"]  # the reader and the finder's model are replayed here
    assert outcome.exit_codes == [0]  # `council serve` stopped in order on SIGTERM
    assert "'scan' is served by pid" in capsys.readouterr().out


async def test_a_replay_of_different_work_fails_and_says_where():
    needle = example("needle")
    from council.replay import ReplayMismatch

    with pytest.raises(ReplayMismatch) as err:  # another seed: another haystack and code
        await needle.run(replaying(needle, "--seed", "8", "--quiet"), out=io.StringIO())
    message = str(err.value)
    assert "finder -> finder-model" in message and "Nearest recorded request" in message
    recorded, _ = needle.haystack(needle.CASSETTE_TOKENS)
    assert f"{len(recorded):,} bytes" in message  # the recorded input, against this run's


@pytest.mark.parametrize("name", ["needle", "review", "conversation", "distributed"])
def test_each_example_declares_a_council_and_a_small_cassette(name, capsys):
    assert main(["show", f"{EXAMPLES / name}.py:council"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("council  entry=")
    cassette = EXAMPLES / "cassettes" / f"{name}.jsonl"
    blobs = cassette.with_suffix(".blobs")
    size = cassette.stat().st_size + sum(
        f.stat().st_size for f in (blobs.iterdir() if blobs.is_dir() else [])
    )
    assert size < MAX_CASSETTE_BYTES, f"{cassette} and its blobs are {size:,} bytes"


def _calls(path: Path) -> list[tuple[str, str, str, str]]:
    """Every call of a cassette, in tree order, as (caller, callee, what it asked, status)."""
    from council import trace
    from council.cassette import Cassette

    t = trace.build(Cassette.load(path))
    out = []
    for root in t.roots:
        for n in root.walk():
            out.append((n.call.caller, n.call.callee, trace.request(n.call)[0][:200], n.status))
    return out


@pytest.mark.parametrize("name", ["needle", "review", "conversation", "distributed"])
async def test_each_bundled_cassette_matches_its_examples_code(name, tmp_path):
    """A strict replay checks the model and human answers only; this also checks every other
    call. Replayed (no model) and recorded again, the example must make exactly the calls its
    cassette holds, and none of them may have failed: a cassette recorded by older code
    (calls it no longer makes, or failures it no longer has) fails here. Re-record with
    `bash examples/rerecord.sh`."""
    module = example(name)
    again = tmp_path / f"{name}.jsonl"
    args = replaying(module, "--quiet", "--record", str(again))
    await module.run(args, out=io.StringIO())
    recorded, replayed = _calls(module.CASSETTE), _calls(again)
    failed = [c for c in recorded if c[3] != "ok"]
    assert not failed, f"{module.CASSETTE} holds failed calls {failed[:3]}; re-record it"
    assert sorted(replayed) == sorted(recorded), (
        f"{module.CASSETTE} no longer matches examples/{name}.py "
        f"(only recorded: {sorted(set(recorded) - set(replayed))[:3]}; "
        f"only in this run: {sorted(set(replayed) - set(recorded))[:3]}); "
        "re-record with: bash examples/rerecord.sh"
    )
