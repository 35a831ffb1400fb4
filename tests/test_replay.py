"""Replay: llm and human peers answered from a cassette while chair and critics run for real."""

from __future__ import annotations

import anyio
import pytest

from channels.bus import Bus
from channels.errors import BadRequest, BudgetExhausted, CallTimeout
from channels.messages import Call, Reply, Usage
from channels.store import Store
from council.cassette import Cassette, CassetteError
from council.record import Recorder
from council.replay import Replayer, ReplayMismatch, UnusedRecordings, request_digest, request_of
from council.trace import build
from tests.conftest import provision_store
from tests.test_record import PARTS, record_council, run_council

pytestmark = pytest.mark.anyio


@pytest.fixture
async def recorded(nats_server, session_id, tmp_path):
    path = tmp_path / "council.jsonl"
    reply, _ = await record_council(nats_server.url, session_id, path)
    return reply, path


async def test_replay_gives_the_same_answer_cost_and_call_tree(nats_server, recorded, tmp_path):
    live, path = recorded
    replayer = Replayer(path)  # peers from the header: llm and human
    assert replayer.names == ["llm", "human"]
    session = "replay1"
    again = tmp_path / "again.jsonl"
    rec_bus = await Bus.connect(nats_server.url, session=session, name="recorder")
    async with Recorder(rec_bus.nc, session, again):
        replayed = await run_council(
            nats_server.url, session, serve_models=False, replay_from=replayer
        )
    await rec_bus.close()
    assert replayed.value == live.value
    assert (replayed.usage.tokens, replayed.usage.model_calls) == (
        live.usage.tokens,
        live.usage.model_calls,
    )
    # the same costs, summed in whatever order the fan-out finished
    assert replayed.usage.cost == pytest.approx(live.usage.cost, rel=1e-12)
    replayer.check(strict=True)  # nothing unmatched, nothing unused
    assert replayer.served == 2 * PARTS + 1
    before, after = build(Cassette.load(path)), build(Cassette.load(again))
    assert [r.shape() for r in after.roots] == [r.shape() for r in before.roots]
    assert len(after.nodes) == len(before.nodes) == 2 * PARTS + 4
    assert "replayed 201 of 201" in replayer.report()


async def test_changed_prompt_fails_naming_the_call(nats_server, recorded):
    _, path = recorded
    replayer = Replayer(path, ["llm", "human"])
    with pytest.raises(BadRequest) as err:  # passed up by critic-b and the chair
        await run_council(
            nats_server.url, "replay2", serve_models=False, tweak=37, replay_from=replayer
        )
    assert "critic-b -> llm" in err.value.message and "part 37" in err.value.message
    assert len(replayer.mismatches) == 1
    mismatch = replayer.mismatches[0]
    msg = str(mismatch)
    assert "critic-b -> llm" in msg and "is part 37 clear and short?" in msg
    assert mismatch.call.prompt.startswith("critic-b: is part 37 clear and short?")
    # the nearest recorded request is the same part, unchanged; the diff shows the edit
    assert mismatch.nearest.call.prompt.startswith("critic-b: is part 37 clear? ")
    assert '-prompt: "critic-b: is part 37 clear? ' in mismatch.diff
    assert '+prompt: "critic-b: is part 37 clear and short? ' in mismatch.diff
    assert "--council-record=new_episodes" in msg
    with pytest.raises(ReplayMismatch, match="part 37"):
        replayer.check()


async def test_the_caller_gets_a_bad_request_with_the_diff(nats_server, recorded, connect):
    _, path = recorded
    replayer = Replayer(path, ["llm"])
    client = await connect("critic-a")
    async with replayer.serving(nats_server.url, client.session):
        ok = await client.call(
            "llm", "critic-a: is part 3 clear? paragraph 3: " + "lorem ipsum " * 4
        )
        assert ok.value.startswith("too wordy") and ok.usage.model_calls == 1
        with pytest.raises(BadRequest) as err:
            await client.call("llm", "critic-a: is part 3 vague? paragraph 3: lorem")
    assert "not in cassette" in err.value.message and "entry " in err.value.message
    assert "critic-a -> llm" in err.value.message
    # the same request again: recorded once, so the second time is a mismatch of its own kind
    replayer2 = Replayer(path, ["llm"])
    async with replayer2.serving(nats_server.url, client.session):
        prompt = "critic-a: is part 3 clear? paragraph 3: " + "lorem ipsum " * 4
        await client.call("llm", prompt)
        with pytest.raises(BadRequest, match="every recorded answer has been used"):
            await client.call("llm", prompt)


async def test_strict_replay_fails_on_unused_recordings(nats_server, recorded, connect):
    _, path = recorded
    replayer = Replayer(path, ["llm", "human"], strict=True)
    client = await connect("critic-a")
    async with replayer.serving(nats_server.url, client.session):
        await client.call("llm", "critic-a: is part 0 clear? paragraph 0: lorem ipsum ")
    assert len(replayer.unused()) == 2 * PARTS
    replayer.check(strict=False)  # lenient: only reported
    with pytest.raises(UnusedRecordings, match=r"200 recorded call\(s\) never requested"):
        replayer.check()


async def test_matching_ignores_ids_deadlines_and_ref_scope(nats_server):
    a = Call(session="s1", caller="x", callee="llm", prompt="p", args={"k": 1}, deadline=1.0)
    b = Call(session="s2", caller="y", callee="llm", prompt="p", args={"k": 1}, deadline=9.0)
    assert a.id != b.id and request_digest(request_of(a)) == request_digest(request_of(b))
    c = b.model_copy(update={"args": {"k": 2}})
    assert request_digest(request_of(c)) != request_digest(request_of(a))


async def test_normalize_lets_run_specific_detail_match(nats_server, recorded, connect):
    """Code whose prompts carry what differs per run (here an object address) can say so."""
    _, path = recorded
    import re

    def no_addresses(request):
        return {**request, "prompt": re.sub(r" at 0x[0-9a-f]+", "", request["prompt"])}

    replayer = Replayer(path, ["llm"], normalize=no_addresses)
    client = await connect("critic-a")
    prompt = "critic-a: is part 1 clear? paragraph 1: " + "lorem ipsum " * 2
    async with replayer.serving(nats_server.url, client.session):
        reply = await client.call("llm", prompt.replace("clear?", "clear at 0x7f3a9c?"))
    assert reply.value == "fine (11 words)"


async def test_identical_requests_replay_in_recorded_order_and_failures_replay(
    nats_server, session_id, tmp_path, connect
):
    """Three identical requests answered differently, a typed failure, a call never answered."""
    path = tmp_path / "order.jsonl"
    server, client, rb = await connect("llm"), await connect("agent"), await connect("rec")
    count = 0

    async def model(call: Call) -> Reply:
        nonlocal count
        if call.prompt == "spend":
            raise BudgetExhausted("out of budget", partial="half", usage=Usage(input_tokens=9))
        if call.prompt == "slow":
            await anyio.sleep(5)
        count += 1
        return Reply(value=f"answer {count}", usage=Usage(output_tokens=count))

    async with Recorder(rb.nc, session_id, path) as rec:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "llm", model)
            got = [(await client.call("llm", "same")).value for _ in range(3)]
            with pytest.raises(BudgetExhausted):
                await client.call("llm", "spend")
            with pytest.raises(CallTimeout):
                await client.call("llm", "slow", timeout=0.2)
            tg.cancel_scope.cancel()
    assert got == ["answer 1", "answer 2", "answer 3"] and rec.summary.calls == 5

    replayer = Replayer(path, ["llm"])
    async with replayer.serving(nats_server.url, "order2"):
        client2 = await Bus.connect(nats_server.url, session="order2", name="agent")
        again = [(await client2.call("llm", "same")).value for _ in range(3)]
        with pytest.raises(BudgetExhausted) as err:
            await client2.call("llm", "spend")
        assert err.value.partial == "half" and err.value.usage.input_tokens == 9
        with pytest.raises(CallTimeout):
            await client2.call("llm", "slow", timeout=5)
        await client2.close()
    assert again == got
    replayer.check(strict=True)


async def test_no_peers_to_replay_is_an_error(nats_server, session_id, tmp_path, connect):
    path = tmp_path / "none.jsonl"
    rb = await connect("rec")
    async with Recorder(rb.nc, session_id, path):
        pass
    with pytest.raises(CassetteError, match="names no peers to replay"):
        Replayer(path)


# -- the pytest plugin, from a fresh test file --------------------------------------------

pytest_plugins = ["pytester"]

FRESH_TEST = """
import pytest
pytestmark = pytest.mark.anyio

async def shout(call):
    return {body}

async def test_shout(council_cassette):
    async with council_cassette.run({{"llm": shout}}) as bus:
        assert (await bus.call("llm", "{prompt}")).value == "HI THERE"
"""


def _fresh(pytester: pytest.Pytester, body: str, prompt: str = "hi there") -> None:
    source = FRESH_TEST.format(body=body, prompt=prompt)
    assert len(source.strip().splitlines()) < 10  # "in under ten lines"
    pytester.makepyfile(test_fresh=source)


def test_plugin_records_once_then_replays_without_the_live_peer(pytester, nats_server, monkeypatch):
    monkeypatch.setenv("NATS_URL", nats_server.url)  # no second server needed
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cassette = pytester.path / "cassettes" / "test_fresh" / "test_shout.jsonl"

    _fresh(pytester, "call.prompt.upper()")
    missing = pytester.runpytest("-q", "--tb=short")
    missing.assert_outcomes(failed=1)  # the default mode, none, only replays
    missing.stdout.fnmatch_lines(["*no cassette at*--council-record=once*"])
    assert not cassette.exists()

    pytester.runpytest("-q", "--tb=short", "--council-record=once").assert_outcomes(passed=1)
    assert cassette.is_file() and Cassette.load(cassette).header.replay == ["llm"]

    # replayed: the live peer is never started (here it would fail if it were)
    _fresh(pytester, "exec(\"raise RuntimeError('no network, no API key')\")")
    pytester.runpytest("-q", "--tb=short").assert_outcomes(passed=1)

    # the code now asks something else: the test fails, naming the call and the difference
    _fresh(pytester, "call.prompt.upper()", prompt="hi where")
    changed = pytester.runpytest("-q", "--tb=short")
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(
        ['*test -> llm call * (prompt "hi where"*', '*-prompt: "hi there"', '*+prompt: "hi where"']
    )
    # a failing test never replaces its cassette, not even when recording
    before = cassette.read_bytes()
    rerecord = pytester.runpytest("-q", "--tb=short", "--council-record=all")
    rerecord.assert_outcomes(failed=1)
    assert cassette.read_bytes() == before

    # new_episodes: the old answer is replayed, the new request answered live, both kept
    pytester.runpytest("-q", "--tb=short", "--council-record=new_episodes").assert_outcomes(
        failed=1  # the live peer answers "HI WHERE", which the test's assert refuses
    )
    _fresh(pytester, "call.prompt.upper().replace('WHERE', 'THERE')", prompt="hi where")
    pytester.runpytest("-q", "--tb=short", "--council-record=new_episodes").assert_outcomes(
        passed=1
    )
    prompts = sorted(it.call.prompt for it in Cassette.load(cassette).interactions())
    assert prompts == ["hi there", "hi where"]
    _fresh(pytester, "exec(\"raise RuntimeError('offline')\")", prompt="hi where")
    pytester.runpytest("-q", "--tb=short").assert_outcomes(passed=1)


async def test_refs_and_spilled_replies_replay_after_the_store_is_gone(
    nats_server, session_id, tmp_path, connect
):
    """A reply too big for a message (spilled by the bus) and a Ref a peer returned itself:
    the recorder keeps their contents, so a replay serves them once the session's store
    has been dropped."""
    path = tmp_path / "refs.jsonl"
    server, client, rb = await connect("llm"), await connect("agent"), await connect("rec")
    big = "word " * 100_000  # 500 kB, over the bus's spill threshold
    notes = {"findings": ["a", "b"], "score": 7}

    async def model(call: Call):
        if call.prompt == "big":
            return big
        return await (await server.store()).put(notes)

    async with Recorder(rb.nc, session_id, path) as rec:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "llm", model)
            assert (await client.call("llm", "big")).value == big
            ref = (await client.call("llm", "notes")).value
            assert await (await client.store()).get(ref) == notes
            tg.cancel_scope.cancel()
    assert rec.summary.refs_saved == 2 and rec.summary.missing_refs == 0
    assert path.stat().st_size < 20_000  # the big value lives in the blobs folder, once
    await (await Store.provision(client.nc, scope=session_id)).drop()  # the session is over

    replayer = Replayer(path, ["llm"])
    await provision_store(nats_server.url, "refs2")  # what the runner does before peers start
    async with replayer.serving(nats_server.url, "refs2"):
        agent = await Bus.connect(nats_server.url, session="refs2", name="agent")
        assert (await agent.call("llm", "big")).value == big
        ref2 = (await agent.call("llm", "notes")).value
        assert ref2.digest == ref.digest and ref2.scope == "refs2"
        assert await (await agent.store()).get(ref2) == notes
        await agent.close()
    replayer.check(strict=True)


LLM_TEST = """
import pytest
from agents.llm import LLMPeer
pytestmark = pytest.mark.anyio

async def test_summary(council_cassette):
    async with council_cassette.run({{"llm": LLMPeer("llm", {model})}}) as bus:
        reply = await bus.call("llm", "Summarise: the cat sat on the mat.")
    assert reply.value == "A cat sat." and reply.usage.model_calls == 1
"""


def test_plugin_replays_a_real_llm_peer_with_no_api_key(pytester, nats_server, monkeypatch):
    """Recorded once (here from a scripted model); replayed where the peer names a paid
    model and no key exists: litellm is never reached."""
    monkeypatch.setenv("NATS_URL", nats_server.url)
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    pytester.makepyfile(test_llm_replayed=LLM_TEST.format(model='["A cat sat."]'))
    pytester.runpytest("-q", "--tb=short", "--council-record=once").assert_outcomes(passed=1)
    cassette = Cassette.load(
        pytester.path / "cassettes" / "test_llm_replayed" / "test_summary.jsonl"
    )
    assert [e.kind for e in cassette.entries].count("call") == 1
    pytester.makepyfile(test_llm_replayed=LLM_TEST.format(model='"openai/gpt-4o-mini"'))
    pytester.runpytest("-q", "--tb=short").assert_outcomes(passed=1)  # live, it would fail: no key
