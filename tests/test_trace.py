"""`council trace`: the call tree of a cassette, in the terminal and as one HTML page."""

from __future__ import annotations

import json
import re
import sys

import anyio
import pytest

from channels.errors import BudgetExhausted, CallTimeout
from channels.messages import Call, Completion, Reply, Usage
from council import trace
from council.cassette import Cassette
from council.record import Recorder
from tests.test_record import PARTS, record_council

pytestmark = pytest.mark.anyio


@pytest.fixture
async def council_cassette_path(nats_server, session_id, tmp_path):
    path = tmp_path / "council.jsonl"
    await record_council(nats_server.url, session_id, path)
    return path


@pytest.fixture
async def failing_cassette(nats_server, session_id, tmp_path, connect):
    """A planner whose model call fails (budget) and whose slow call times out."""
    path = tmp_path / "failing.jsonl"
    planner, model, user, rb = (
        await connect("planner"),
        await connect("model"),
        await connect("user"),
        await connect("rec"),
    )

    async def answer(call: Call) -> Reply:
        await model.publish(
            Completion(session=model.session, peer="model", call=call.id, model="scripted-1")
        )
        if call.prompt == "slow":
            await anyio.sleep(5)
        raise BudgetExhausted(
            "spent the budget", partial="a half plan", usage=Usage(input_tokens=7)
        )

    async def plan(call: Call) -> str:
        for prompt, timeout in (("think hard", 5.0), ("slow", 0.2)):
            try:
                await planner.call("model", prompt, parent=call, timeout=timeout)
            except (BudgetExhausted, CallTimeout):
                pass
        return "gave up"

    async with Recorder(rb.nc, session_id, path):
        async with anyio.create_task_group() as tg:
            await tg.start(model.serve, "model", answer)
            await tg.start(planner.serve, "planner", plan)
            await user.call("planner", "plan the offsite")
            tg.cancel_scope.cancel()
    return path


async def test_terminal_tree_folds_fan_outs(council_cassette_path, capsys):
    assert trace.main([str(council_cassette_path), "--max-children", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("session ") and "rlm-council" in lines[0]
    assert f"{PARTS * 2 + 4} calls, 0 failed" in lines[1] and "200 model calls" in lines[1]
    assert re.search(r"^└─ chair <- user  \"review the draft\"  => .* tok \$0\.00\d\d", out, re.M)
    assert out.count("llm <- critic-a") == 3  # folded after three
    assert f"… {PARTS - 3} more calls" in out and "--all shows them" in out
    assert "human <- chair" in out and '=> "ship it"' in out
    trace.main([str(council_cassette_path), "--all"])
    assert capsys.readouterr().out.count("llm <- critic-") == 2 * PARTS
    trace.main([str(council_cassette_path), "--depth", "1"])
    folded = capsys.readouterr().out
    assert "llm <-" not in folded and f"… {PARTS} calls below" in folded


async def test_failures_and_timeouts_show_in_the_tree(failing_cassette, capsys):
    assert trace.main([str(failing_cassette)]) == 0
    out = capsys.readouterr().out
    assert "3 calls, 2 failed" in out
    assert out.count("model <- planner [scripted-1]") == 2  # from its completion events
    assert "!! budget_exhausted: spent the budget" in out
    assert re.search(r'model <- planner \[scripted-1\]  "slow"  !! timeout: .*ran out of time', out)
    built = trace.build(Cassette.load(failing_cassette))
    (root,) = built.roots
    assert [c.status for c in root.children] == ["budget_exhausted", "timeout"]
    assert root.children[0].value == "a half plan" and root.children[0].usage.input_tokens == 7


async def test_trace_reads_a_cut_cassette(council_cassette_path, tmp_path):
    lines = council_cassette_path.read_bytes().split(b"\n")
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(lines[:40]) + b"\n")  # a crashed session: still traceable
    done = await anyio.run_process([sys.executable, "-m", "council.trace", str(cut)], check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert "incomplete recording: it has no end record" in done.stdout.decode()
    # not a cassette at all: refused, saying what to do
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"hello\n" + b"\n".join(lines[1:]))
    done = await anyio.run_process([sys.executable, "-m", "council.trace", str(bad)], check=False)
    assert done.returncode == 1
    assert "not a council cassette" in done.stderr.decode()


async def _trace(path, tmp_path):
    page = tmp_path / (path.stem + ".html")
    done = await anyio.run_process(
        [sys.executable, "-m", "council.trace", "--all", str(path), "--html", str(page)],
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    data = re.search(
        r'<script type="application/json" id="data">(.*?)</script>', page.read_text(), re.S
    )
    assert data is not None
    return done.stdout.decode(), json.loads(data.group(1).replace("<\\/", "</"))


def _tree_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "<-" in line]


async def test_a_garbage_line_is_shown_as_such_and_the_rest_of_the_trace_too(
    council_cassette_path, tmp_path
):
    whole, _ = await _trace(council_cassette_path, tmp_path)
    lines = council_cassette_path.read_bytes().split(b"\n")
    n = next(i for i, line in enumerate(lines) if b'"kind":"event"' in line)  # not a call
    bad = tmp_path / "garbage.jsonl"
    bad.write_bytes(b"\n".join([*lines[:n], b"\x00{garbage", *lines[n:]]))
    text, page = await _trace(bad, tmp_path)
    assert f"line {n + 1}: not JSON" in text
    assert _tree_lines(text) == _tree_lines(whole)  # every call still shown
    assert any(f"line {n + 1}: not JSON" in d for d in page["damaged"])
    assert page["totals"]["calls"] == len(_tree_lines(whole)) or page["nodes"]


async def test_an_unknown_message_type_is_shown_as_such(council_cassette_path, tmp_path):
    whole, _ = await _trace(council_cassette_path, tmp_path)
    lines = council_cassette_path.read_bytes().split(b"\n")
    obj = json.loads(lines[3])
    # what a newer peer might send: a type this version has never heard of
    odd = {**obj, "kind": "event", "msg": {"type": "telepathy", "v": 1, "call": "x"}}
    odd2 = {**obj, "kind": "teleport", "msg": {"type": "call"}}
    bad = tmp_path / "unknown.jsonl"
    bad.write_bytes(
        b"\n".join([*lines[:3], json.dumps(odd).encode(), json.dumps(odd2).encode(), *lines[3:]])
    )
    text, page = await _trace(bad, tmp_path)
    assert "unknown message type 'telepathy'" in text
    assert "line 5: a record of unknown kind 'teleport'" in text
    assert _tree_lines(text) == _tree_lines(whole)
    assert sum("unknown" in d for d in page["damaged"]) == 2
    # replay refuses the damaged file but never crashes on the unknown message itself
    with pytest.raises(Exception, match=r"line 5 is not a valid entry record"):
        Cassette.load(bad)


async def test_a_cut_off_last_line_is_shown_as_such(council_cassette_path, tmp_path):
    lines = council_cassette_path.read_bytes().split(b"\n")
    cut = tmp_path / "half.jsonl"
    cut.write_bytes(b"\n".join(lines[:30]) + b"\n" + lines[30][: len(lines[30]) // 2])
    text, page = await _trace(cut, tmp_path)
    assert "incomplete recording: its last line (31) is cut off mid-record" in text
    assert "line 31: cut off mid-record" in text
    assert page["complete"] is False and any("cut off" in d for d in page["damaged"])
    assert _tree_lines(text)  # what came before is shown


async def test_html_page_is_self_contained(council_cassette_path, tmp_path, capsys):
    page = tmp_path / "out" / "trace.html"
    assert trace.main([str(council_cassette_path), "--html", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # no network assets
    assert "@import" not in text and "url(" not in text
    data = json.loads(
        re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
        .group(1)
        .replace("<\\/", "</")
    )
    assert len(data["nodes"]) == 2 * PARTS + 4 and data["totals"]["model_calls"] == 2 * PARTS
    root = data["nodes"][0]
    assert (root["parent"], root["callee"], root["n"]) == (-1, "chair", 2 * PARTS + 3)


async def test_html_escapes_what_the_models_said(nats_server, session_id, tmp_path, connect):
    """A prompt holding `</script>` cannot break out of the page's data block."""
    path = tmp_path / "x.jsonl"
    server, client, rb = await connect("echo"), await connect("c"), await connect("r")

    async def echo(call: Call) -> str:
        return call.prompt

    async with Recorder(rb.nc, session_id, path):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "echo", echo)
            await client.call("echo", "</script><script>alert(1)</script>")
            tg.cancel_scope.cancel()
    html = trace.render_html(trace.build(Cassette.load(path)))
    assert html.count("</script>") == 2  # the page's own two
    assert "alert(1)" in html


async def test_trace_subcommand_hooks_into_a_cli(council_cassette_path, tmp_path, capsys):
    """How council/cli.py mounts it: `trace.add_parser(sub)`, then `args.func(args)`."""
    import argparse

    parser = argparse.ArgumentParser(prog="council")
    sub = parser.add_subparsers(dest="command", required=True)
    trace.add_parser(sub)
    page = tmp_path / "t.html"
    args = parser.parse_args(["trace", str(council_cassette_path), "--html", str(page)])
    assert args.func(args) == 0
    assert "chair <- user" in capsys.readouterr().out and page.stat().st_size > 10_000
    args = parser.parse_args(["trace", str(tmp_path / "missing.jsonl")])
    assert args.func(args) == 1
    assert "no cassette at" in capsys.readouterr().err
