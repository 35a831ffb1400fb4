"""The trace page in a real browser: headless Chromium driven over WebDriver (chromedriver).

Needs the Debian packages `chromium` and `chromium-driver`: `.ci/run` installs them and
makes a missing browser a failure; elsewhere the test skips, saying how to install them. Only loopback traffic: chromedriver on a
free local port, the page from a file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from council import trace
from council.cassette import Cassette
from tests.test_record import PARTS, record_council

pytestmark = pytest.mark.anyio

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
]


class WebDriver:
    """Just enough of the W3C WebDriver protocol, over urllib, for one session."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.session = ""

    def _send(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"webdriver {method} {path}: {e.read()[:500]!r}") from None

    def start(self, profile: str) -> None:
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": str(CHROMIUM),
                "args": [*FLAGS, f"--user-data-dir={profile}"],
            },
        }
        self.session = self._send("POST", "/session", {"capabilities": {"alwaysMatch": caps}})[
            "sessionId"
        ]

    def cmd(self, method: str, path: str, body: Any = None) -> Any:
        return self._send(method, f"/session/{self.session}{path}", body)

    def js(self, script: str, *args: Any) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> dict[str, str]:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})

    def click(self, element: dict[str, str]) -> None:
        self.cmd("POST", f"/element/{element[ELEMENT]}/click", {})

    def displayed(self, element: dict[str, str]) -> bool:
        return self.cmd("GET", f"/element/{element[ELEMENT]}/displayed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        # A browser is a system package, not something pip can bring; CI installs it and sets
        # COUNCIL_REQUIRE_CHROMIUM=1, so there this check runs every time or fails.
        why = (
            "headless Chromium is needed to check the trace page: "
            "apt-get update && apt-get install -y chromium chromium-driver"
        )
        if os.environ.get("COUNCIL_REQUIRE_CHROMIUM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="council-chromium-")
    driver = subprocess.Popen(
        [str(CHROMEDRIVER), f"--port={port}", "--allowed-ips=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wd = WebDriver(port)
    try:
        end = time.monotonic() + 20
        while True:
            try:
                if wd._send("GET", "/status").get("ready"):
                    break
            except (OSError, AssertionError):
                pass
            assert time.monotonic() < end, "chromedriver did not start"
            time.sleep(0.05)
        wd.start(profile)
        yield wd
    finally:
        if wd.session:
            try:
                wd.cmd("DELETE", "")
            except Exception:
                pass
        driver.terminate()
        driver.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


async def test_trace_page_renders_and_a_node_expands_on_click(
    nats_server, session_id, tmp_path, browser
):
    path = tmp_path / "council.jsonl"
    await record_council(nats_server.url, session_id, path)
    page = tmp_path / "trace.html"
    page.write_text(trace.render_html(trace.build(Cassette.load(path))))

    browser.cmd("POST", "/url", {"url": page.as_uri()})
    assert browser.cmd("GET", "/title") == f"council trace {session_id}"
    # it rendered: one tree row and one timeline bar per call, and loaded nothing else
    counts = browser.js(
        "return [document.querySelectorAll('#tree .row').length,"
        " document.querySelectorAll('#timeline .bar').length,"
        " performance.getEntriesByType('resource').length]"
    )
    assert counts == [2 * PARTS + 4, 2 * PARTS + 4, 0]

    critic = browser.find("#tree .row[data-callee='critic-a']")
    first_llm = browser.find("#tree .row[data-callee='critic-a'] + ul .row")
    assert browser.displayed(critic) and not browser.displayed(first_llm)  # collapsed
    browser.click(critic)
    assert browser.displayed(first_llm)  # expanded: its 100 calls are shown
    shown = browser.js(
        "var ul=arguments[0].nextElementSibling; return [ul.children.length,"
        " arguments[0].parentNode.classList.contains('collapsed'),"
        " document.querySelector('#detail h2').textContent]",
        critic,
    )
    assert shown == [PARTS, False, "chair → critic-a  [ok]"]
    browser.click(critic)
    assert not browser.displayed(first_llm)  # and folds again

    # a timeline bar reveals its call in the tree, inside a collapsed critic
    last_bar = browser.js("var b=document.querySelectorAll('#timeline .bar'); return b[b.length-2]")
    browser.js("arguments[0].scrollIntoView()", last_bar)
    browser.click(last_bar)
    detail = browser.js("return document.querySelector('#detail').textContent")
    assert "critic-b → llm" in detail and "is part" in detail
    selected = browser.find("#tree .row.sel")
    assert browser.displayed(selected)


async def test_a_damaged_cassette_page_lists_what_it_could_not_read_and_shows_the_rest(
    nats_server, session_id, tmp_path, browser
):
    path = tmp_path / "council.jsonl"
    await record_council(nats_server.url, session_id, path)
    lines = path.read_bytes().split(b"\n")
    odd = json.loads(lines[3]) | {"kind": "event", "msg": {"type": "telepathy", "v": 1}}
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(  # garbage, an unknown type, and a last line cut off mid-record
        b"\n".join([*lines[:3], b"\x00garbage", json.dumps(odd).encode(), *lines[3:-3]])
        + b"\n"
        + lines[-3][:25]
    )
    page = tmp_path / "damaged.html"
    page.write_text(trace.render_html(trace.build(Cassette.load(damaged, lenient=True))))
    browser.cmd("POST", "/url", {"url": page.as_uri()})
    shown = browser.js(
        "return [document.querySelector('#title').textContent,"
        " Array.from(document.querySelectorAll('#damaged li')).map(function(l){"
        "return l.textContent;}), document.querySelectorAll('#tree .row').length]"
    )
    title, notes, rows = shown
    assert title.endswith("(incomplete recording)")
    assert any("line 4: not JSON" in n for n in notes)
    assert any("unknown message type 'telepathy'" in n for n in notes)
    assert any("cut off mid-record" in n for n in notes)
    assert rows >= 2 * PARTS  # the calls that were read are all there


async def record_model_calls(url: str, session: str, path: Path) -> None:
    """A root agent whose model is scripted and a reader whose price is unknown (cost None,
    as for a local model): model-call rows, a set_context row, and `$?` costs."""
    from agents.models import FunctionModel
    from council.declare import LLM, Agent, Council
    from council.session import Session

    council = Council(
        entry="solver",
        peers=[
            Agent("solver", model="scripted/root", calls=["reader"]),
            LLM("reader", model="scripted/reader"),
        ],
    )
    code = "```python\nFINAL(reader('What is the vault code?', context=context))\n```"
    models = {
        "scripted/root": FunctionModel(lambda messages: code),
        "scripted/reader": FunctionModel(lambda messages: "4711", cost=None),
    }
    async with Session(council, nats_url=url, session=session, models=models, record=path) as s:
        result = await s.ask("Find the vault code in the text.", context="The code is 4711.")
        assert result.value == "4711"


async def test_trace_page_shows_requests_searches_and_explains_unknown_costs(
    nats_server, session_id, tmp_path, browser
):
    path = tmp_path / "model.jsonl"
    await record_model_calls(nats_server.url, session_id, path)
    page = tmp_path / "model.html"
    page.write_text(trace.render_html(trace.build(Cassette.load(path))))
    browser.cmd("POST", "/url", {"url": page.as_uri()})

    # A model call's row shows the request it was sent (its last message), as the terminal
    # view does; a set_context row shows its op; neither is an empty pair of quotes.
    labels = browser.js(
        "var o={}; document.querySelectorAll('#tree .row').forEach(function(r){"
        "o[r.dataset.callee]=(o[r.dataset.callee]||[]).concat([r.querySelector('.pr').textContent]);});"
        "return o;"
    )
    [model_row] = labels["solver-model"]
    assert "Request: Find the vault code in the text." in model_row
    assert "[set_context]" in labels["solver-repl"]
    assert not any(label in ("\u201c\u201d", "") for rows in labels.values() for label in rows)

    # Search: typing a word of the reader's question finds that call, reveals and selects it.
    box = browser.find("#search")
    browser.cmd("POST", f"/element/{box[ELEMENT]}/value", {"text": "vault code?"})
    found = browser.js(
        "return [document.querySelector('#hits').textContent,"
        " document.querySelector('#detail h2').textContent,"
        " Array.from(document.querySelectorAll('#tree .row.hit')).map(function(r){"
        "return r.dataset.callee;})]"
    )
    hits, selected, rows = found
    # the first hit is selected; the model call whose code asks it and the reader both match
    assert selected == f"solver → {rows[0]}  [ok]"
    assert {"solver-model", "reader"} <= set(rows)
    assert hits == f"{len(rows)} matches (Enter: next)"
    for _ in rows:  # Enter walks the hits, revealing each: one of them is the reader's call
        if browser.js("return document.querySelector('#detail h2').textContent").startswith(
            "solver-repl → reader"
        ):
            break
        browser.cmd("POST", f"/element/{box[ELEMENT]}/value", {"text": "\ue007"})
    else:
        raise AssertionError("Enter never reached the reader's call")
    assert browser.displayed(browser.find("#tree .row.sel[data-callee='reader']"))
    browser.cmd("POST", f"/element/{box[ELEMENT]}/clear", {})
    browser.cmd("POST", f"/element/{box[ELEMENT]}/value", {"text": "4711"})
    assert browser.js("return document.querySelectorAll('#tree .row.hit').length") >= 2
    browser.cmd("POST", f"/element/{box[ELEMENT]}/clear", {})
    browser.cmd("POST", f"/element/{box[ELEMENT]}/value", {"text": "no such thing anywhere"})
    assert browser.js("return document.querySelector('#hits').textContent") == "0 matches"

    # Selecting the model call shows its request in the details pane.
    browser.click(browser.find("#tree .row[data-callee='solver-model']"))
    detail = browser.js("return document.querySelector('#detail').textContent")
    assert "request" in detail and "Request: Find the vault code in the text." in detail

    # `$?` says why: the reader's price is unknown, and the page has a legend for it.
    unknown = browser.js(
        "var u=document.querySelector('#tree .row[data-callee=\"reader\"] .unk');"
        " return [u.textContent, u.title, document.querySelector('#legend').textContent]"
    )
    assert unknown[0] == "$?" and "cost unknown" in unknown[1]
    assert unknown[2].startswith("$? = cost unknown")
