"""`council demo`: the README's first command, offline, on a fresh checkout.

It starts the embedded nats-server, runs example 1 (an agent finds a code hidden in a
million tokens without the text entering a prompt) and a small council (the review
council of example 2: a chair, two critics, a reader and a human), then prints each
session's call tree from its recording.

Where the model answers come from, said up front:

- the `local` extra installed: SmolLM2-135M, served on loopback by llama-cpp-python, is
  the sub-LLM that reads. A 135M model cannot write useful code, so the agents' root
  model is the examples' scripted driver (a function writing the code a capable model
  would); everything else, including the REPL running that code, is real.
- otherwise (or with --replay, or COUNCIL_DEMO_REPLAY=1): the model and human answers
  come from the cassettes bundled in examples/cassettes/, while the agents and their
  REPL code run for real.

The examples live in the source tree's examples/ folder, which the README's editable
install keeps beside this package.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from channels.errors import CouncilError
from council.declare import load_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REPLAY_ENV = "COUNCIL_DEMO_REPLAY"
LIVE_TOKENS = 1_000_000


class DemoUnavailable(CouncilError):
    """The demo cannot run here (its examples folder is missing)."""


def _example(name: str) -> ModuleType:
    path = EXAMPLES / f"{name}.py"
    if not path.is_file():
        raise DemoUnavailable(
            f"the demo runs the examples in {EXAMPLES}, and {path.name} is not there; run it "
            "from a source checkout installed with pip install -e '.[dev]'"
        )
    return load_file(path)


def local_model_missing() -> str | None:
    """Why SmolLM2 cannot be served here, or None when it can."""
    from agents.local import LocalModelMissing, require_llama_server, smollm2_path

    try:
        require_llama_server()
        smollm2_path()
    except LocalModelMissing as e:
        return str(e)
    return None


def _say(out: TextIO, text: str = "") -> None:
    print(text, file=out, flush=True)


async def run(
    *,
    replay: bool = False,
    nats_url: str | None = None,
    out: TextIO = sys.stdout,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Run the demo; returns a summary (also printed last, as one JSON line, by the CLI)."""
    from channels.server import embedded_server

    started = time.monotonic()
    needle, review = _example("needle"), _example("review")
    shared = sys.modules["_shared"]
    why_not = None if replay else local_model_missing()
    live = not replay and why_not is None
    if live:
        _say(
            out,
            "Council demo, offline. Sub-LLM: SmolLM2-135M on llama-cpp-python (the "
            "`local` extra), on loopback.",
        )
        _say(
            out,
            "The agents' root model is a scripted driver: a 135M model cannot write useful code.",
        )
    else:
        reason = "asked for" if replay else f"the local model is not available ({why_not})"
        _say(
            out,
            f"Council demo, offline. Replaying the bundled cassettes in {EXAMPLES / 'cassettes'} "
            f"({reason}): model and human answers come from the recordings; the agents and "
            "their REPL code run for real.",
        )
    with tempfile.TemporaryDirectory(prefix="council-demo-") as tmp:
        where = keep or Path(tmp)
        recordings = {"needle": where / "needle.jsonl", "review": where / "review.jsonl"}
        server_cm = None if nats_url else embedded_server()
        server = await server_cm.__aenter__() if server_cm else None
        try:
            url = nats_url or server.url  # type: ignore[union-attr]
            if server is not None:
                _say(out, f"started the embedded nats-server at {url} (pid {server.pid})")
            else:
                _say(out, f"using NATS at {url}")
            summary = await _both(
                needle, review, shared, live=live, url=url, recordings=recordings, out=out
            )
        finally:
            if server_cm is not None:
                await server_cm.__aexit__(None, None, None)
        _say(out)
        _say(out, "== the call trees, from the sessions' recordings")
        from council.cassette import Cassette
        from council.trace import build, render_text

        for name, path in recordings.items():
            _say(out)
            _say(out, render_text(build(Cassette.load(path)), max_children=6))
    summary["source"] = "smollm2" if live else "cassette"
    summary["seconds"] = round(time.monotonic() - started, 1)
    _say(out)
    _say(
        out,
        f"demo done in {summary['seconds']} s "
        f"({'live SmolLM2' if live else 'answers from the bundled cassettes'})",
    )
    return summary


async def _both(
    needle: ModuleType,
    review: ModuleType,
    shared: ModuleType,
    *,
    live: bool,
    url: str,
    recordings: dict[str, Path],
    out: TextIO,
) -> dict[str, Any]:
    def argv(module: ModuleType, name: str) -> list[str]:
        a = ["--record", str(recordings[name])]
        return a if live else [*a, "--replay", str(module.CASSETTE), "--strict"]

    needle_args = needle.options(
        [*argv(needle, "needle"), *(["--tokens", str(LIVE_TOKENS)] if live else [])]
    )
    review_args = review.options([*argv(review, "review"), "--scripted-human"])
    server = None
    if live:
        from agents.local import LocalModelServer

        server = await LocalModelServer(n_ctx=4096).astart(timeout=180)
        _say(out, f"SmolLM2 is serving at {server.api_base} (ready in {server.started_in:.1f} s)")
    try:

        def models(module: ModuleType) -> Any:
            drive = {shared.DRIVER: shared.driver(module.script)}
            if server is None:
                label = f"replaying {module.CASSETTE.name}"
                return shared.Models(module.council, drive, label)
            label = "SmolLM2 reads; a scripted driver writes the agents' code"
            return shared.Models(
                module.council, {**drive, shared.LOCAL: server.model()}, label, server
            )

        _say(out)
        _say(out, "== example 1: a needle in a haystack (examples/needle.py)")
        found = await needle.run(needle_args, nats_url=url, out=out, models=models(needle))
        _say(out)
        _say(out, "== a small council: the review council (examples/review.py)")
        reviewed = await review.run(review_args, nats_url=url, out=out, models=models(review))
    finally:
        if server is not None:
            server.cleanup()
    return {
        "needle": {
            "answer": found.value,
            "expected": found.expected,
            "found": found.found,
            "tokens": found.tokens,
            "largest_root_prompt_chars": found.largest_prompt,
        },
        "review": {
            "publish": bool(reviewed.value.get("publish"))
            if isinstance(reviewed.value, dict)
            else None,
            "ok": reviewed.ok,
        },
    }


def wants_replay(flag: bool) -> bool:
    return flag or os.environ.get(REPLAY_ENV, "").lower() in ("1", "true", "yes")
