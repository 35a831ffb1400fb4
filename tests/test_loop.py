"""The RLM loop's exact limits and small fixes (issue 13): scripted models, a real
nats-server, real REPL workers and the real store."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from agents.limits import Limits
from agents.llm import LLMPeer
from agents.models import FunctionModel, ScriptedModel
from agents.prompt import PeerSpec, plain_final
from agents.repl.host import Repl
from agents.rlm import RLMAgent
from channels.errors import BadRequest, BudgetExhausted, DepthExceeded, PeerError
from channels.messages import Reply
from channels.store import Store
from tests.conftest import serving

pytestmark = pytest.mark.anyio

LLM = PeerSpec("llm", "a small model")


def code(body: str) -> str:
    return f"Working.\n```python\n{body}\n```"


def closing(messages: list[dict[str, Any]]) -> bool:
    return "last turn" in messages[-1]["content"]


# -- exact limits ------------------------------------------------------------------------------


async def test_iterations_bound_the_turns_whose_code_runs_and_the_closing_turn_calls_no_peer(
    nats_server, session_id
):
    """iterations=2: two turns run code that calls a peer; the closing turn asks for the
    answer and its code's peer call is refused, so the peer is called exactly twice."""
    sub_calls: list[str] = []
    root_calls = 0

    def sub(messages, **_):
        sub_calls.append(messages[-1]["content"])
        return "sub answer"

    def root(messages, **_):
        nonlocal root_calls
        root_calls += 1
        if closing(messages):
            return code(
                "try:\n    llm('one more?')\nexcept CallFailed as e:\n"
                "    FINAL('refused: ' + type(e).__name__)"
            )
        return code(f"x{root_calls} = llm('look {root_calls}')\nprint(x{root_calls})")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", calls=[LLM], limits=Limits(iterations=2)),
        LLMPeer("root-model", FunctionModel(root)),
        LLMPeer("llm", FunctionModel(sub)),
    ) as client:
        with pytest.raises(BudgetExhausted) as err:
            await client.call("root", "never done", timeout=60)
    assert sub_calls == ["look 1", "look 2"]
    assert root_calls == 3  # two working turns and the closing one
    assert err.value.partial == "refused: BudgetExhausted"
    assert "2 iterations" in err.value.message
    assert err.value.usage.model_calls == 3 + 2


async def test_the_time_limit_holds_inside_the_closing_turn(nats_server, session_id):
    """Closing-turn code that would run for 30 s is stopped at the agent's own 2 s limit
    (the old last turn ran until the caller's deadline)."""

    def root(messages, **_):
        if closing(messages):
            return code("import time\ntime.sleep(30)\nFINAL('late')")
        return code("import time\ntime.sleep(0.3)\nprint('working')")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", limits=Limits(seconds=2)),
        LLMPeer("root-model", FunctionModel(root)),
    ) as client:
        started = time.monotonic()
        with pytest.raises(BudgetExhausted, match="time limit"):
            await client.call("root", "slow", timeout=60)
        elapsed = time.monotonic() - started
    assert elapsed < 12, elapsed  # 2 s and start-up on a loaded machine, not 30 s


async def test_an_uncaught_depth_failure_ends_the_run_with_that_failure(nats_server, session_id):
    """A peer agent past its depth limit refuses; the root's code does not catch it, so the
    run ends at once with DepthExceeded instead of spending more turns retrying."""
    root_model = ScriptedModel([code("r = deep('go')\nFINAL(r)")])
    deep_model = ScriptedModel([])  # never asked: the refusal comes before any model call

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", calls=[PeerSpec("deep")], limits=Limits(iterations=5)),
        RLMAgent("deep", limits=Limits(depth=0)),
        LLMPeer("root-model", root_model),
        LLMPeer("deep-model", deep_model),
    ) as client:
        with pytest.raises(DepthExceeded) as err:
            await client.call("root", "top", timeout=60)
    assert "depth 1" in err.value.message and err.value.message.startswith("root:")
    assert len(root_model.calls) == 1 and deep_model.calls == []
    assert err.value.usage.model_calls == 1


async def test_a_caught_failure_does_not_end_the_run(nats_server, session_id):
    root_model = ScriptedModel(
        [code("try:\n    deep('go')\nexcept CallFailed as e:\n    FINAL(e.kind)")]
    )
    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", calls=[PeerSpec("deep")]),
        RLMAgent("deep", limits=Limits(depth=0)),
        LLMPeer("root-model", root_model),
        LLMPeer("deep-model", ScriptedModel([])),
    ) as client:
        assert (await client.call("root", "top", timeout=60)).value == "depth_exceeded"


# -- small fixes -------------------------------------------------------------------------------


async def test_rlm_is_not_offered_at_the_depth_limit(nats_server, session_id):
    """With depth=1 the root is offered `rlm`; its child (at depth 1) is not: neither in its
    system prompt nor in its namespace."""
    systems: dict[str, str] = {}

    def model(messages, request, **_):
        systems[request] = messages[0]["content"]
        if request == "top":
            return code("FINAL(rlm('child', context='x'))")
        return code("FINAL('rlm' in globals())")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", can_spawn=True, limits=Limits(depth=1)),
        LLMPeer("root-model", FunctionModel(model)),
    ) as client:
        reply = await client.call("root", "top", timeout=60)
    assert reply.value is False
    assert "- rlm(" in systems["top"]
    assert "rlm(" not in systems["child"]


async def test_an_empty_completion_is_asked_again_then_fails_typed(nats_server, session_id):
    flaky = ScriptedModel(["", "  ", code("FINAL(7)")])
    always_empty = ScriptedModel(["", "", ""])
    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", limits=Limits(iterations=1)),
        RLMAgent("mute"),
        LLMPeer("root-model", flaky),
        LLMPeer("mute-model", always_empty),
    ) as client:
        # Two empty replies did not use up the single turn.
        assert (await client.call("root", "seven", timeout=60)).value == 7
        with pytest.raises(PeerError, match="empty completion 3 times"):
            await client.call("mute", "anything", timeout=60)
    flaky.assert_done()
    always_empty.assert_done()


async def test_a_positional_context_is_handed_on_as_its_ref_unread(connect, session_id):
    """`echo("...", context)` passes the 40 MB input on without the worker loading it."""
    bus, peer = await connect("chair"), await connect("echo")
    store = await Store.open(peer.nc, scope=bus.session)
    big = await store.put("0123456789" * 4_000_000)
    received: list[Any] = []

    async def echo(call):
        received.append(call.context)
        return Reply(value="ok")

    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: peer.serve("echo", echo, task_status=task_status))
        async with Repl(bus, agent="chair", peers=[PeerSpec("echo")], context=big) as repl:
            for line in ("echo('forward', context)", "echo.start('forward', context).result()"):
                result = await repl.execute(line)
                assert result.status == "ok", result.for_model()
            assert (await repl.stats()).store_reads == {}
        tg.cancel_scope.cancel()
    assert received == [big, big]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is:\nFINAL(42)", 42),
        ("I am done.\n  FINAL('Paris').\nThat is all (really).", "Paris"),
        ("FINAL(The capital is Paris)", "The capital is Paris"),
        ("FINAL(Paris)", "Paris"),  # a name that is not defined: taken as text
    ],
)
async def test_a_plain_text_final_is_accepted_without_a_code_block(
    nats_server, session_id, text, expected
):
    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root"),
        LLMPeer("root-model", ScriptedModel([text])),
    ) as client:
        assert (await client.call("root", "q", timeout=60)).value == expected


def test_plain_final_reads_a_variable_and_ignores_prose_without_final():
    assert plain_final("no answer here") is None
    assert plain_final("When I know it I will call FINAL(answer) in code.") is None
    assert plain_final("FINAL_VAR('answer')") == "FINAL_VAR('answer')"
    assert "FINAL(__final)" in plain_final("FINAL(total)")


async def test_a_child_may_be_given_smaller_limits_not_larger(nats_server, session_id):
    """`rlm(..., iterations=1)` runs the child with one working turn; asking for more than
    the agent's own limit is a clear BadRequest the parent's code can read."""
    child_turns: list[str] = []

    def model(messages, request, **_):
        if request == "top":
            return code(
                "try:\n    rlm('greedy', context='x', iterations=50)\n"
                "except CallFailed as e:\n    refused = str(e)\n"
                "try:\n    rlm('small', context='x', iterations=1)\n"
                "except CallFailed as e:\n    small = [e.kind, e.partial]\n"
                "FINAL({'refused': refused, 'small': small})"
            )
        child_turns.append(request)
        if closing(messages):
            return code("FINAL('child closing')")
        return code("print('child works')")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", can_spawn=True, limits=Limits(depth=1, iterations=4)),
        LLMPeer("root-model", FunctionModel(model)),
    ) as client:
        reply = await client.call("root", "top", timeout=60)
    assert "iterations=50" in reply.value["refused"]
    assert "at most 4" in reply.value["refused"]
    # The child stopped after one working turn and the closing one.
    assert reply.value["small"] == ["budget_exhausted", "child closing"]
    assert child_turns == ["small", "small"]


async def test_child_limits_past_the_remaining_budget_are_refused(nats_server, session_id):
    def model(messages, request, **_):
        return code("FINAL(rlm('x', context='y', tokens=10**9))")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", can_spawn=True, limits=Limits(depth=1, tokens=100_000)),
        LLMPeer("root-model", FunctionModel(model)),
    ) as client:
        with pytest.raises(BadRequest, match="tokens=1000000000"):
            await client.call("root", "top", timeout=60)


async def test_a_recursion_that_never_ends_is_cut_short_not_multiplied(nats_server, session_id):
    """The issue's run: iterations=3, depth=2, code that recurses without catching. The
    leaf (no `rlm` at the limit) uses its 3 turns and the closing one; its BudgetExhausted
    is not caught above, so each level ends at once: 6 model calls, not 84."""
    calls = 0

    def model(messages, **_):
        nonlocal calls
        calls += 1
        return code("FINAL(rlm('deeper', context='x'))")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", can_spawn=True, limits=Limits(iterations=3, depth=2)),
        LLMPeer("root-model", FunctionModel(model)),
    ) as client:
        with pytest.raises(BudgetExhausted) as err:
            await client.call("root", "top", timeout=60)
    assert calls == 6
    assert err.value.usage.model_calls == 6
    assert "3 iterations" in err.value.message and err.value.message.count("root:") == 1


async def test_a_budget_spent_by_the_code_ends_with_the_partial_result(nats_server, session_id):
    """Sub-calls use up the run's own tokens mid-code: the run ends as its own budget
    exhausted, with what the turn printed, not with the refused sub-call's bare failure."""

    def root(messages, **_):
        return code("for i in range(10):\n    print('got', llm(f'part {i}'))")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", calls=[LLM], limits=Limits(tokens=3_000)),
        LLMPeer("root-model", FunctionModel(root)),
        LLMPeer("llm", FunctionModel(lambda m: "piece", usage=(500, 100))),
    ) as client:
        with pytest.raises(BudgetExhausted) as err:
            await client.call("root", "spend", timeout=60)
    assert "root stopped at the token budget" in err.value.message
    assert "got piece" in err.value.partial
    assert err.value.usage.tokens <= 3_000 + 600  # one sub-call may be in flight at the edge
