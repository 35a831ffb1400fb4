"""Typed outputs and inputs of agents and LLM peers; what scripted models are given.

Scripted models, a real nats-server and REPLs; the structured-output request goes through
litellm to a real OpenAI-compatible HTTP server on loopback.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from agents.limits import Limits
from agents.llm import LLMPeer
from agents.models import FunctionModel, LiteLLMModel, ScriptedModel
from agents.prompt import PeerSpec
from agents.rlm import RLMAgent
from channels.errors import BadRequest, PeerError
from council import (
    LLM,
    Agent,
    BudgetExhausted,
    CallFailed,
    Council,
    ScriptedHuman,
    Session,
)
from council import (
    FunctionModel as ExportedFunctionModel,
)
from council import (
    ScriptedModel as ExportedScriptedModel,
)
from tests.conftest import serving
from tests.scripted_http import ScriptedHTTP

pytestmark = pytest.mark.anyio


class Verdict(BaseModel):
    ok: bool
    reasons: list[str] = []
    score: int


def code(body: str) -> str:
    return f"```python\n{body}\n```"


# -- agents ------------------------------------------------------------------------------------


async def test_a_wrong_shape_is_sent_back_and_the_caller_gets_the_validated_value(
    nats_server, session_id
):
    judge_model = ScriptedModel(
        [
            code("FINAL({'ok': 'perhaps', 'score': 3})"),  # ok is not a bool
            code("FINAL({'ok': 'yes', 'score': '4'})"),  # lax: 'yes' -> True, '4' -> 4
        ]
    )
    root_model = ScriptedModel([code("v = judge('is it fine?')\nFINAL([v, type(v).__name__])")])
    judge = RLMAgent("judge", output=Verdict)
    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("root", calls=[PeerSpec("judge", signature=judge.signature)]),
        judge,
        LLMPeer("root-model", root_model),
        LLMPeer("judge-model", judge_model),
    ) as client:
        reply = await client.call("root", "ask the judge", timeout=60)
    # The root's REPL received the validated value, defaults filled in, as plain data.
    assert reply.value == [{"ok": True, "reasons": [], "score": 4}, "dict"]
    told = judge_model.calls[1][-1]["content"]
    assert "does not fit the required type Verdict" in told and "ok" in told
    # The judge's own prompt, and the signature its caller reads, carry the schema.
    assert '"score"' in judge_model.calls[0][0]["content"]
    assert '"reasons"' in root_model.calls[0][0]["content"]
    assert reply.usage.model_calls == 3  # the rejected answer counted against the judge


async def test_a_final_that_never_fits_ends_as_budget_exhausted(nats_server, session_id):
    model = ScriptedModel([code("FINAL('no')")] * 3)
    async with serving(
        nats_server.url,
        session_id,
        RLMAgent("judge", output=Verdict, limits=Limits(iterations=2)),
        LLMPeer("judge-model", model),
    ) as client:
        with pytest.raises(BudgetExhausted) as err:
            await client.call("judge", "q", timeout=60)
    assert err.value.partial == "no"  # the closing turn's value, not of the type
    model.assert_done()


async def test_inputs_that_do_not_fit_fail_before_any_model_call(nats_server, session_id):
    asked: list[Any] = []

    def fn(messages, request, context):
        asked.append(request)
        return code("FINAL(len(context) * args['n'])")

    agent = RLMAgent("shout", inputs={"context": str, "n": int})
    async with serving(
        nats_server.url, session_id, agent, LLMPeer("shout-model", FunctionModel(fn))
    ) as client:
        with pytest.raises(BadRequest, match="n: Input should be a valid integer"):
            await client.call("shout", "bad n", context="hi", args={"n": "many"}, timeout=60)
        with pytest.raises(BadRequest, match="context: Input should be a valid string"):
            await client.call("shout", "bad context", context=[1, 2], args={"n": 2}, timeout=60)
        store = await client.store()
        big = await store.put(b"\x00" * 1000)
        with pytest.raises(BadRequest, match="stored bytes value is not str"):
            await client.call("shout", "stored bytes", context=big, args={"n": 1}, timeout=60)
        assert asked == []  # none of those reached the model
        text = await store.put("ab" * 300_000)  # stored text fits `str` by its kind
        reply = await client.call("shout", "fine", context=text, args={"n": "2"}, timeout=60)
    assert reply.value == 1_200_000 and asked == ["fine"]
    assert "n: int" in agent.signature and "context: str" in agent.signature


# -- LLM peers ---------------------------------------------------------------------------------


async def test_an_llm_peer_validates_and_repairs_its_reply(nats_server, session_id):
    formats: list[Any] = []

    def fn(messages, response_format=None, **_):
        formats.append(response_format)
        if len(formats) == 1:
            return '{"ok": true}'  # score missing
        return '```json\n{"ok": true, "score": 9}\n```'

    async with serving(
        nats_server.url, session_id, LLMPeer("rate", FunctionModel(fn), output=Verdict)
    ) as client:
        reply = await client.call("rate", "rate this", timeout=60)
    assert reply.value == {"ok": True, "reasons": [], "score": 9}
    assert formats[0]["json_schema"]["schema"]["required"] == ["ok", "score"]
    assert reply.usage.model_calls == 2


async def test_an_llm_peer_that_never_fits_fails_typed(nats_server, session_id):
    async with serving(
        nats_server.url,
        session_id,
        LLMPeer("rate", ScriptedModel(["nope"] * 3), output=list[int]),
    ) as client:
        with pytest.raises(PeerError, match="did not answer with a list"):
            await client.call("rate", "numbers", timeout=60)


async def test_response_format_reaches_an_openai_server_through_litellm(nats_server, session_id):
    with ScriptedHTTP() as stub:
        stub.say(json.dumps({"value": [1, 2, 3]}))
        model = LiteLLMModel("openai/typed-stub", api_base=stub.api_base, api_key="sk-test")
        async with serving(
            nats_server.url, session_id, LLMPeer("nums", model, output=list[int])
        ) as client:
            reply = await client.call("nums", "three numbers", timeout=60)
    assert reply.value == [1, 2, 3]
    sent = stub.requests[0].body["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["schema"]["properties"]["value"] == {
        "items": {"type": "integer"},
        "type": "array",
    }


# -- for users writing tests ------------------------------------------------------------------


async def test_a_council_with_scripted_models_keyed_by_peer_name():
    """What the README shows: scripted models by peer name, request and context as fields."""
    seen: dict[str, Any] = {}

    def chair(messages, request, context):
        seen["chair"] = (request, context)
        return code("FINAL(summary(context=context))")

    council = Council(
        entry="chair",
        peers=[
            Agent("chair", model="gpt-4o-mini", calls=["summary"]),
            LLM("summary", model="gpt-4o-mini", output=Verdict),
        ],
    )
    models = {
        "chair": ExportedFunctionModel(chair),
        "summary": ExportedScriptedModel(['{"ok": true, "score": 5}']),
    }
    async with Session(council, models=models) as s:
        result = await s.ask("Is the draft fine?", context="a short draft")
    assert result.value == {"ok": True, "reasons": [], "score": 5}
    assert seen["chair"] == ("Is the draft fine?", "a short draft")
    assert issubclass(BudgetExhausted, CallFailed) and ScriptedHuman is not None


# -- the README's promises --------------------------------------------------------------------


def _readme_block(containing: str) -> str:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.+?)\n```", readme, re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_readme_typed_council_declares_what_it_says():
    namespace: dict[str, Any] = {"__name__": "readme_typed"}
    exec(_readme_block("class Verdict"), namespace)
    council = namespace["council"]
    chair, judge = council.peer("chair"), council.peer("judge")
    assert '"accept"' in chair.signature and chair.signature.startswith(
        "(prompt: str, context: str"
    )
    assert '"reasons"' in judge.signature
    assert council.edges()["chair"][-1] == "cheap"  # the summariser is an edge of the agent


def test_readme_scripted_models_example_runs():
    exec(_readme_block("FunctionModel(chair)"), {"__name__": "readme_scripted"})


def test_a_type_sent_to_another_process_checks_the_same_shape():
    """A declaration loaded elsewhere: importable classes are imported again, anything
    else is checked against its JSON schema."""
    from agents.schema import Mismatch, TypeSpec

    for tp, good, bad in [
        (Verdict, {"ok": True, "score": 1}, {"ok": True}),
        (list[int], [1, 2], ["x"]),
        (dict[str, float], {"a": 1.5}, {"a": "high"}),
    ]:
        here = TypeSpec.of(tp)
        there = TypeSpec.model_validate_json(here.model_dump_json())
        assert there == here and there._type is None
        assert there.validate_json_value(good)
        with pytest.raises(Mismatch):
            there.validate_json_value(bad)
    assert TypeSpec.of(Verdict).path.endswith("test_typed:Verdict")
