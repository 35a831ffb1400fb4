"""Declaring councils: every problem reported at once, JSON round trips, digests, the tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.function import Peers
from channels import permissions
from council.declare import (
    LLM,
    Agent,
    Council,
    Function,
    Human,
    Limits,
    LoadError,
    NotSerialisable,
    TopologyError,
    load_target,
)


def word_count(text: str) -> int:
    """Count the words of a text.

    Whitespace separates words."""
    return len(text.split())


async def top(prompt: str, n: int = 3, *, peers: Peers) -> list[str]:
    return prompt.split()[:n]


def example() -> Council:
    return Council(
        entry="chair",
        peers=[
            Agent(
                "chair",
                model="gpt-4o-mini",
                calls=["critic_a", "critic_b", "llm", "ada", "word_count"],
                limits=Limits(iterations=12),
            ),
            Agent(
                "critic_a", model="gpt-4o-mini", instructions="Find logical flaws.", calls=["llm"]
            ),
            Agent("critic_b", model="gpt-4o-mini", instructions="Check the facts.", calls=["llm"]),
            LLM("llm", model="gpt-4o-mini"),
            Human("ada"),
            Function(word_count),
        ],
    )


def test_a_council_reads_as_declared_and_prints_as_a_tree():
    council = example()
    assert council.peer("word_count").signature == "(text: str) -> int"
    assert council.peer("word_count").description == "Count the words of a text."
    assert council.peer("ada").signature == "(question: str, context=None) -> str"
    tree = council.show()
    lines = tree.splitlines()
    assert lines[1].startswith("chair  agent  model=gpt-4o-mini  limits: iterations=12")
    assert "├── critic_a  agent" in tree and "│   └── llm  llm  model=gpt-4o-mini" in tree
    assert "└── word_count  function (text: str) -> int" in tree
    assert council.digest[:19] in lines[0]
    # What the chair's model is told it may call: names, descriptions, signatures.
    specs = {s.name: s for s in council.specs(council.peer("chair"))}
    assert specs["word_count"].signature == "(text: str) -> int"
    assert list(specs) == ["critic_a", "critic_b", "llm", "ada", "word_count"]


def test_function_signatures_hide_what_the_runtime_injects():
    f = Function(top, calls=["x"])
    assert f.signature == "(prompt: str, n: int = 3) -> list[str]"


def test_every_problem_is_reported_at_once():
    with pytest.raises(TopologyError) as info:
        Council(
            entry="chiar",
            peers=[
                Agent("chair", calls=["critic", "chair"]),
                Agent("chair", model="m"),
                Human("a.b"),
                LLM("chair-model", model="m"),
                LLM("admin", model="m"),
            ],
        )
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 8, text
    for needle in (
        "two peers are named 'chair'",
        "'a.b' has '.'",
        "clashes with the model peer of agent 'chair'",
        "agent 'chair' has no model",
        "calls 'critic', which is not a peer",
        "calls itself; use can_spawn=True",
        "entry 'chiar' is not a peer of this council; did you mean 'chair'?",
        "llm name 'admin' is reserved for the runner",
    ):
        assert needle in text


def test_a_default_model_fills_in_and_with_model_overrides():
    c = Council(entry="a", model="m1", peers=[Agent("a", calls=["l"]), LLM("l")])
    assert c.model_of(c.peer("a")) == "m1"
    c2 = c.with_model("m2")
    assert {c2.model_of(p) for p in c2.peers} == {"m2"}
    assert c2.digest != c.digest


def test_json_round_trip_keeps_the_digest_and_resolves_functions_elsewhere(tmp_path):
    council = example()
    text = council.to_json()
    again = Council.from_json(text)
    assert again.digest == council.digest
    assert again == council
    data = json.loads(text)
    assert data["peers"][-1]["fn"].endswith("test_declare:word_count")
    # Another process loads it and gets the same digest, with the function importable.
    code = textwrap.dedent(
        """
        import sys
        from council.declare import Council
        c = Council.from_json(sys.stdin.read())
        print(c.digest, c.peer("word_count").callable()("one two three"))
        """
    )
    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, str(Path(here).parent)])}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [council.digest, "3"]


def test_lambdas_and_closures_are_refused_for_serialisation_with_the_fix():
    def inner(x: str) -> str:
        return x

    c = Council(
        entry="f",
        peers=[Function(lambda x: x, name="f"), Function(inner), Function(word_count)],
    )
    with pytest.raises(NotSerialisable) as info:
        c.to_json()
    msg = str(info.value)
    assert "'f'" in msg and "lambda; define it with `def` at module level" in msg
    assert "'inner'" in msg and "move it to module level" in msg
    assert "word_count" not in msg
    assert c.digest.startswith("sha256:")  # still digestible for a recording


def test_load_target_from_a_file_and_bad_targets(tmp_path):
    f = tmp_path / "mycouncil.py"
    f.write_text(
        textwrap.dedent(
            """
            from council.declare import Council, Function

            def shout(text: str) -> str:
                return text.upper()

            council = Council(entry="shout", peers=[Function(shout)])
            other = 3
            """
        )
    )
    c = load_target(f"{f}:council")
    assert c.peer("shout").fn == f"{f.resolve()}:shout"
    assert load_target(str(f)).digest == c.digest  # NAME defaults to council
    again = Council.from_json(c.to_json())
    assert again.peer("shout").callable()("hi") == "HI"
    with pytest.raises(LoadError, match="not a Council"):
        load_target(f"{f}:other")
    with pytest.raises(LoadError, match="has no attribute 'nope'"):
        load_target(f"{f}:nope")
    with pytest.raises(LoadError, match="does not exist"):
        load_target(f"{tmp_path}/missing.py:council")
    with pytest.raises(LoadError, match="not a council declaration"):
        Council.from_json('{"entry": "x", "peers": [{"kind": "robot", "name": "x"}]}')


def test_rights_follow_the_edges():
    council = example()
    edges = council.edges()
    assert set(edges["chair"]) == {
        "critic_a",
        "critic_b",
        "llm",
        "ada",
        "word_count",
        "chair-model",
        "chair-repl",
    }
    assert edges["chair-repl"] == edges["chair"]  # the REPL worker has its agent's rights
    assert edges["llm"] == [] and edges["ada-desk"] == []
    r = permissions.rights("s1", edges, serves=council.serves())
    chair = r.for_peer("chair")
    assert "council.s1.call.critic_a.chair" in chair.publish
    assert "council.s1.call.critic_a.chair-repl" in chair.publish  # its REPL calls as itself
    assert not any(".call.critic_a." in s for s in r.for_peer("critic_b").publish)
    assert "council.s1.call.chair-repl.*" in chair.subscribe  # the worker may share its user
    assert r.authorization().count("{user:") == len(edges) + 1


# -- random topologies -------------------------------------------------------------------------

GOOD = ["a", "b", "c", "d-1", "e_2"]
BAD = ["x.y", "", "sp ace", "*", "é"]


@st.composite
def topologies(draw):
    n = draw(st.integers(1, 5))
    names = [
        draw(st.sampled_from(GOOD + BAD[:2] if draw(st.booleans()) else GOOD)) for _ in range(n)
    ]
    peers = []
    for name in names:
        kind = draw(st.sampled_from(["agent", "llm", "human", "function"]))
        model = draw(st.sampled_from([None, "m"]))
        calls = draw(st.lists(st.sampled_from([*GOOD, "zz"]), max_size=3, unique=True))
        peers.append((kind, name, model, calls))
    entry = draw(st.sampled_from([*names, "zz"]))
    default_model = draw(st.sampled_from([None, "m"]))
    return peers, entry, default_model


def _make(kind, name, model, calls):
    if kind == "agent":
        return Agent(name, model=model, calls=calls)
    if kind == "llm":
        return LLM(name, model=model)
    if kind == "human":
        return Human(name)
    return Function("tests.test_declare:word_count", name=name, calls=calls)


def _expected(peers, entry, default_model) -> list[str]:
    """An independent statement of the rules: one short tag per problem."""
    valid = {n for _, n, _, _ in peers if n in GOOD}
    names = [n for _, n, _, _ in peers]
    out = []
    for n in set(names):
        if n not in GOOD:
            out.append(f"badname:{n}")
        elif names.count(n) > 1:
            out.append(f"dup:{n}")
    for kind, name, model, calls in peers:
        if kind in ("agent", "llm") and not (model or default_model):
            out.append(f"model:{name}")
        if kind in ("agent", "function"):
            for c in calls:
                if c == name:
                    out.append(f"self:{name}")
                elif c not in valid:
                    out.append(f"unknown:{name}->{c}")
    if entry not in valid:
        out.append(f"entry:{entry}")
    return list(dict.fromkeys(out))  # the same problem twice is reported once


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topologies())
def test_random_topologies_build_or_list_every_problem(topology):
    peers, entry, default_model = topology
    expected = _expected(peers, entry, default_model)
    try:
        decls = [_make(*p) for p in peers]
        council = Council(entry=entry, peers=decls, model=default_model)
    except TopologyError as e:
        assert expected, f"refused a valid council: {e}"
        text = str(e)
        for tag in expected:
            what, _, detail = tag.partition(":")
            if what == "badname":
                assert f"{detail!r}" in text, (tag, text)
            elif what == "dup":
                assert f"two peers are named {detail!r}" in text, (tag, text)
            elif what == "model":
                assert f"{detail!r} has no model" in text, (tag, text)
            elif what == "self":
                assert f"{detail!r} calls itself" in text, (tag, text)
            elif what == "unknown":
                caller, callee = detail.split("->")
                assert f"{caller!r} calls {callee!r}, which is not a peer" in text, (tag, text)
            elif what == "entry":
                assert f"entry {detail!r} is not a peer" in text, (tag, text)
        assert len(e.problems) >= len(expected)
        return
    assert not expected, f"accepted an invalid council: {expected}"
    # A valid council builds everything the runner needs from it.
    again = Council.from_json(council.to_json())
    assert again.digest == council.digest
    edges = council.edges()
    r = permissions.rights("s", edges, serves=council.serves())
    assert set(r.users) == set(edges)
    assert council.show().splitlines()[1].startswith(entry)
