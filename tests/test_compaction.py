"""Compaction: older turns fold into a summary so a long run stays inside a small window,
and what was folded is still in the REPL. Scripted models, a real nats-server and REPLs."""

from __future__ import annotations

import re
from typing import Any

import pytest

from agents.compaction import folded, pairs
from agents.limits import Compaction, Limits
from agents.llm import LLMPeer
from agents.models import FunctionModel, message_tokens
from agents.rlm import RLMAgent
from channels import subjects
from channels.messages import Step, decode
from council import LLM, Agent, Council, Session
from council.cassette import Cassette
from council.trace import build, render_text
from tests.conftest import serving

pytestmark = pytest.mark.anyio

WINDOW = 2_500
TURNS = 30
PADDING = "lorem ipsum " * 110  # about 330 tokens of output a turn


def turn_code(n: int) -> str:
    if n == 1:
        return "fact_1 = 7\nprint('the password is swordfish; ' + PAD)".replace(
            "PAD", repr(PADDING)
        )
    if n < TURNS:
        return f"fact_{n} = {7 * n}\nprint('turn {n} noted; ' + {PADDING!r})"
    return (
        "import re\n"
        "pw = next(re.search(r'password is (\\w+)', t['output']).group(1)\n"
        "          for t in transcript if 'password is' in t['output'])\n"
        f"total = sum(globals()[f'fact_{{i}}'] for i in range(1, {TURNS}))\n"
        "FINAL({'password': pw, 'total': total, 'turns_in_transcript': len(transcript)})"
    )


class Script:
    """The root model: turn n writes turn_code(n); a summary request gets a summary."""

    def __init__(self) -> None:
        self.turn = 0
        self.prompts: list[list[dict[str, Any]]] = []
        self.summaries = 0

    def __call__(self, messages: list[dict[str, Any]], **_: Any) -> str:
        if messages[-1]["content"].startswith("[compaction]"):
            self.summaries += 1
            found = sorted(set(re.findall(r"fact_(\d+) =", messages[1]["content"])), key=int)
            return f"Defined fact_{found[0]} to fact_{found[-1]}; printed long notes."
        self.prompts.append(messages)
        self.turn += 1
        return f"Turn {self.turn}.\n```python\n{turn_code(self.turn)}\n```"


async def test_thirty_turns_in_a_2500_token_window(nats_server, session_id):
    script = Script()
    model = FunctionModel(script, context_window=WINDOW)  # the peer refuses anything larger
    agent = RLMAgent("root", limits=Limits(iterations=40), compaction=Compaction(window=WINDOW))
    async with serving(nats_server.url, session_id, agent, LLMPeer("root-model", model)) as client:
        sub = await client.nc.subscribe(subjects.events(session_id))
        reply = await client.call("root", "Work through the turns.", timeout=120)
        steps = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except Exception:
                break
            event = decode(msg.data)
            if isinstance(event, Step) and event.detail.startswith("compacted"):
                steps.append(event.detail)
        await sub.unsubscribe()
    assert reply.value == {
        "password": "swordfish",
        "total": 7 * sum(range(1, TURNS)),
        "turns_in_transcript": TURNS - 1,
    }
    sizes = [message_tokens(p) for p in script.prompts]
    assert len(sizes) == TURNS
    assert max(sizes) <= WINDOW
    # Without folding, the last prompt would be about 30 turns of 350 tokens.
    assert sizes[-1] < WINDOW * 0.75
    assert script.summaries >= 3 and len(steps) == script.summaries
    last = "\n".join(m["content"] for m in script.prompts[-1])
    assert "swordfish" not in last  # the fact came from the REPL, not the prompt
    assert "transcript" in last and "Summary of those turns" in last
    # identity, request and the latest turn stay verbatim
    assert script.prompts[-1][0] == script.prompts[0][0]
    assert script.prompts[-1][1]["content"].startswith(script.prompts[0][1]["content"])
    assert "turn 29 noted" in last


def test_a_fold_fits_its_target_even_when_the_latest_turns_are_huge():
    system = {"role": "system", "content": "s" * 2000}
    huge = [
        ({"role": "assistant", "content": "a" * 40_000}, {"role": "user", "content": "u" * 40_000})
    ]
    out = folded(system, "Request: q", "summary " * 50, 5, huge, target=1_500)
    assert message_tokens(out) <= 1_500
    assert out[0] == system and out[1]["content"].startswith("Request: q")
    assert len(pairs(out)) == 1  # the latest turn kept, cut in the middle


def council_for(window: int) -> Council:
    return Council(
        entry="root",
        peers=[
            Agent(
                "root",
                model="thinker",
                limits=Limits(iterations=20),
                compaction=Compaction(window=window, model="cheap"),
            ),
            LLM("cheap", model="summariser"),
        ],
    )


class ShortScript(Script):
    def __call__(self, messages: list[dict[str, Any]], **_: Any) -> str:
        self.prompts.append(messages)
        self.turn += 1
        if self.turn < 8:
            return f"```python\nfact_{self.turn} = {self.turn}\nprint({PADDING!r})\n```"
        return "```python\nFINAL(sum(globals()[f'fact_{i}'] for i in range(1, 8)))\n```"


async def test_a_fold_uses_the_declared_summariser_is_traced_and_replays(tmp_path):
    cassette = tmp_path / "fold.jsonl"
    script, summaries = ShortScript(), []

    def cheap(messages, **_):
        summaries.append(messages[-1]["content"])
        return "Defined some facts."

    models = {"root": FunctionModel(script), "cheap": FunctionModel(cheap)}
    async with Session(council_for(1_500), models=models, record=cassette) as s:
        live = await s.ask("go", timeout=120)
    assert live.value == 28 and summaries  # the cheaper declared model wrote the summaries
    assert script.summaries == 0
    shown = render_text(build(Cassette.load(cassette)))
    assert "cheap <- root" in shown and "[compaction]" in shown
    async with Session(council_for(1_500), models={}, replay=cassette, strict=True) as s:
        replayed = await s.ask("go", timeout=120)
    assert replayed.value == 28


async def test_the_window_comes_from_litellms_model_info():
    from council.session import build as build_peers

    council = Council(entry="a", peers=[Agent("a", model="gpt-4o-mini")])
    agent, thinker = build_peers(council, "a")
    assert await agent.window() == thinker.model.context_window == 128_000


async def test_a_failing_summariser_still_folds_and_the_run_goes_on(nats_server, session_id):
    script = ShortScript()

    def broken(messages, **_):
        raise ValueError("summariser is down")

    agent = RLMAgent("root", compaction=Compaction(window=1_500, model="cheap"))
    async with serving(
        nats_server.url,
        session_id,
        agent,
        LLMPeer("root-model", FunctionModel(script, context_window=1_500)),
        LLMPeer("cheap", FunctionModel(broken)),
    ) as client:
        reply = await client.call("root", "go", timeout=120)
    assert reply.value == 28
    assert max(message_tokens(p) for p in script.prompts) <= 1_500
    assert any("no summary: the summariser failed" in p[1]["content"] for p in script.prompts)
