"""The RLM loop with scripted models, a real nats-server, real REPL workers and the real store."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from agents.limits import Limits
from agents.llm import LLMPeer
from agents.models import FunctionModel, ModelResponse, ScriptedModel, message_tokens
from agents.prompt import PeerSpec
from agents.rlm import RLMAgent
from channels import subjects
from channels.errors import BudgetExhausted, DepthExceeded
from channels.messages import Completion, Ref, decode
from tests.conftest import serving

pytestmark = pytest.mark.anyio

LLM = PeerSpec("llm", "a small model that reads one piece of text")


def code(body: str) -> str:
    return f"Let me work on it.\n```python\n{body}\n```"


def haystack(tokens: int, needle: int, seed: int = 1) -> str:
    """About four characters a token, the needle somewhere in the second half."""
    rng = random.Random(seed)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "quis", "nostrud", "ullamco"]
    filler = " ".join(rng.choice(words) for _ in range(tokens * 4 // 6 + 1))
    at = rng.randrange(len(filler) // 2, len(filler) - 100)
    at = filler.index(" ", at)
    return filler[:at] + f" The secret number is {needle}. " + filler[at:]


def reader(messages: list[dict[str, Any]], **_: Any) -> str:
    """A sub-model that finds the needle in the piece it was given, or says NONE."""
    found = re.search(r"secret number is (\d+)", messages[-1]["content"])
    return found.group(1) if found else "NONE"


NEEDLE_CODE = """
size = 200_000
pieces = [context[i:i + size + 100] for i in range(0, len(context), size)]
answers = llm.map(["What is the secret number? Answer NONE if absent."] * len(pieces), contexts=pieces)
hits = [a for a in answers if a != "NONE"]
print(len(pieces), "pieces,", hits)
FINAL(int(hits[0]))
"""


async def needle_run(nats_server, session: str, tokens: int) -> tuple[Any, list[int], float]:
    prompt_sizes: list[int] = []

    def root(messages: list[dict[str, Any]], **_: Any) -> str:
        prompt_sizes.append(sum(len(m["content"]) for m in messages))
        return code(NEEDLE_CODE)

    agent = RLMAgent("root", calls=[LLM])
    async with serving(
        nats_server.url,
        session,
        agent,
        LLMPeer("root-model", FunctionModel(root)),
        LLMPeer("llm", FunctionModel(reader)),
    ) as client:
        store = await client.store()
        text = haystack(tokens, 7341)
        ref = await store.put(text)
        started = time.perf_counter()
        reply = await client.call("root", "Find the secret number.", context=ref, timeout=120)
        wall = time.perf_counter() - started
        assert reply.usage.model_calls == 1 + math.ceil(len(text) / 200_000)
        return reply, prompt_sizes, wall


async def test_needle_in_a_haystack_at_10k_and_1m_tokens(nats_server, session_id):
    small, small_prompts, small_wall = await needle_run(nats_server, session_id + "a", 10_000)
    large, large_prompts, wall = await needle_run(nats_server, session_id + "b", 1_000_000)
    assert small.value == 7341 and large.value == 7341
    # The input never enters the prompt: the root's prompt is the same size at both scales.
    assert len(small_prompts) == len(large_prompts) == 1
    assert abs(large_prompts[0] - small_prompts[0]) <= 0.1 * small_prompts[0]
    assert large_prompts[0] < 5_000
    print(
        f"needle: root prompt {small_prompts[0]} chars at 10k tokens ({small_wall:.2f}s), "
        f"{large_prompts[0]} chars at 1M tokens ({wall:.2f}s)"
    )


async def test_no_code_and_errors_are_fed_back(nats_server, session_id):
    seen: list[str] = []
    replies = iter(
        [
            "I think the answer is 4.",
            code("x = 1 +"),
            code("raise ValueError('nope')"),
            code("FINAL(2 + 2)"),
        ]
    )

    def root(messages, **_):
        seen.append(messages[-1]["content"])
        return next(replies)

    async with serving(
        nats_server.url, session_id, RLMAgent("root"), LLMPeer("root-model", FunctionModel(root))
    ) as client:
        reply = await client.call("root", "What is 2 + 2?", timeout=60)
    assert reply.value == 4
    assert "no ```python block" in seen[1]
    assert "SyntaxError" in seen[2]
    assert "ValueError: nope" in seen[3]


async def test_final_var_and_a_ref_value(nats_server, session_id):
    steps = iter([code("big = 'x' * 2_000_000\nsmall = {'n': 3}"), code("FINAL_VAR('big')")])

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root"),
        LLMPeer("root-model", FunctionModel(lambda m, **_: next(steps))),
    ) as client:
        reply = await client.call("root", "make something big", timeout=60)
        assert isinstance(reply.value, Ref) and reply.value.size == 2_000_000
        assert await (await client.store()).get(reply.value) == "x" * 2_000_000


def forever(messages, **_):
    return code("print('still looking')")


@pytest.mark.parametrize(
    ("limits", "model_cost", "reason"),
    [
        (Limits(iterations=3), None, "3 iterations"),
        (Limits(tokens=3000), None, "token budget"),
        (Limits(cost=0.05), 0.02, "cost budget"),
        (Limits(seconds=1.5), None, "time limit"),
    ],
)
async def test_every_limit_ends_with_budget_exhausted_and_the_partial_result(
    nats_server, session_id, limits, model_cost, reason
):
    """Each limit stops the run with room left for a closing turn, and is not passed:
    a model call that the tokens or money left could not pay for is not made."""
    turns = 0

    def root(messages, **_):
        nonlocal turns
        turns += 1
        if "last turn" in messages[-1]["content"]:
            text = code("FINAL('best guess')")
        else:
            text = code(
                "import time\ntime.sleep(0.4)\nprint('still looking')"
                if limits.seconds
                else "print('still looking')"
            )
        # Tokens as the estimate counts them (what the agent foresees), the cost as given.
        return ModelResponse(
            text=text,
            input_tokens=message_tokens(messages),
            output_tokens=len(text) // 4,
            cost=model_cost,
            model="root",
        )

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", limits=limits),
        LLMPeer("root-model", FunctionModel(root)),
    ) as client:
        with pytest.raises(BudgetExhausted) as err:
            await client.call("root", "never finishes", timeout=60)
    assert reason in err.value.message
    assert err.value.partial == "best guess"
    usage = err.value.usage
    assert usage is not None and usage.model_calls == turns
    if limits.tokens is not None:
        assert usage.tokens <= limits.tokens
    if limits.cost is not None:
        assert usage.cost <= limits.cost
    if limits.seconds is not None:
        assert usage.wall_time <= limits.seconds + 1.0


async def test_time_limit_stops_a_long_sub_call(nats_server, session_id):
    """The run's deadline travels into the execution: code that sleeps is cut off."""

    def root(messages, **_):
        if "last turn" in messages[-1]["content"]:
            return code("FINAL('late')")
        return code("import time\ntime.sleep(30)")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", limits=Limits(seconds=1.0)),
        LLMPeer("root-model", FunctionModel(root)),
    ) as client:
        started = time.monotonic()
        with pytest.raises(BudgetExhausted, match="time limit"):
            await client.call("root", "slow", timeout=60)
        assert time.monotonic() - started < 20


def usage_model(text_for: Callable[[list[dict[str, Any]]], str], tokens: tuple[int, int]):
    def fn(messages, **_):
        return ModelResponse(
            text=text_for(messages),
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            cost=0.001 * sum(tokens),
            model="scripted",
        )

    return FunctionModel(fn)


async def test_usage_is_exact_over_a_depth_two_tree_with_fan_out(nats_server, session_id):
    """Root fans out to 3 children; each child fans out 4 sub-LLM calls. Nothing is dropped."""

    def root_text(messages):
        if messages[1]["content"].startswith("Request: top"):
            if len(messages) == 2:
                return code(
                    "out = rlm.map(['child'] * 3, contexts=['a', 'b', 'c'])\nFINAL(sorted(out))"
                )
        return code("parts = llm.map(['q'] * 4, contexts=list('wxyz'))\nFINAL(''.join(parts))")

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", calls=[LLM], can_spawn=True, limits=Limits(depth=1)),
        LLMPeer("root-model", usage_model(root_text, (100, 10))),
        LLMPeer("llm", usage_model(lambda m: "k", (7, 3))),
    ) as client:
        reply = await client.call("root", "top", timeout=60)
    assert reply.value == ["kkkk", "kkkk", "kkkk"]
    model_calls = 1 + 3 * (1 + 4)
    assert reply.usage.model_calls == model_calls
    assert reply.usage.input_tokens == 100 * (1 + 3) + 7 * 12
    assert reply.usage.output_tokens == 10 * (1 + 3) + 3 * 12
    assert reply.usage.cost == pytest.approx(0.001 * (110 * 4 + 10 * 12))


async def test_a_child_past_the_depth_limit_is_refused(nats_server, session_id):
    """A child call at depth 2 under a depth limit of 1 is refused before any model call
    (code never gets to send one: `rlm` is not offered at the limit, see test_loop.py)."""
    model = ScriptedModel([])
    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", can_spawn=True, limits=Limits(depth=1)),
        LLMPeer("root-model", model),
    ) as client:
        call = client.make_call("root-child", "go deeper", timeout=60)
        with pytest.raises(DepthExceeded, match="depth 2"):
            await client.send(call.model_copy(update={"depth": 2}))
    assert model.calls == []


async def test_a_conversation_keeps_early_facts_in_history_not_in_the_prompt(
    nats_server, session_id
):
    prompts: list[str] = []

    def root(messages, **_):
        prompts.append("\n".join(m["content"] for m in messages))
        request = messages[1]["content"]
        if "My name is" in request:
            return code("FINAL('noted')")
        if "weather" in request:
            return code("FINAL('sunny')")
        return code(
            "import re\n"
            "name = next(re.search(r'My name is (\\w+)', t['request']).group(1) "
            "for t in history if 'My name is' in t['request'])\n"
            "FINAL(name)"
        )

    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root"),
        LLMPeer("root-model", FunctionModel(root)),
    ) as client:
        args = {"conversation": "c1"}
        assert (
            await client.call("root", "My name is Ada.", args=args, timeout=60)
        ).value == "noted"
        assert (
            await client.call("root", "How is the weather?", args=args, timeout=60)
        ).value == "sunny"
        third = await client.call("root", "What is my name?", args=args, timeout=60)
    assert third.value == "Ada"
    assert "Ada" not in prompts[-1]
    assert "history" in prompts[-1]


async def test_completions_are_published_as_events(nats_server, session_id):
    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root"),
        LLMPeer("root-model", FunctionModel(lambda m, **_: code("FINAL(1)"))),
    ) as client:
        sub = await client.nc.subscribe(subjects.events(session_id))
        await client.nc.flush()
        await client.call("root", "x", timeout=60)
        kinds = set()
        with anyio.move_on_after(2):
            while "completion" not in kinds or "execution" not in kinds or "step" not in kinds:
                msg = await sub.next_msg(timeout=2)
                event = decode(msg.data)
                kinds.add(event.type)
                if isinstance(event, Completion):
                    assert event.response.startswith("Let me work")
        await sub.unsubscribe()
    assert {"completion", "execution", "step"} <= kinds


async def test_a_spare_worker_is_booted_before_the_first_request(nats_server, session_id):
    """A request runs in a worker booted ahead of it; another is booted for the next one."""
    # Unsandboxed, so the worker's os.getpid() is its pid here (a sandboxed one is PID 2 of
    # a namespace of its own).
    agent = RLMAgent("root", repl_options={"sandbox": "off"})
    pid_model = FunctionModel(lambda m, **_: code("import os\nFINAL(os.getpid())"))

    async def spare_pid() -> int:
        with anyio.fail_after(30):
            return await agent.warm()

    async with serving(
        nats_server.url, session_id, agent, LLMPeer("root-model", pid_model)
    ) as client:
        first = await spare_pid()
        assert (await client.call("root", "who runs this?", timeout=60)).value == first
        second = await spare_pid()
        assert second != first
        assert (await client.call("root", "and this?", timeout=60)).value == second
