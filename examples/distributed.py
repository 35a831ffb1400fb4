"""A distributed council: the same council in one process, then spread over several, with
the same answer.

The council finds a code hidden in a long text (as in needle.py), with the search done
by a plain function peer, `scan`, that reads the text from the shared store itself: the
agent hands it the reference and never loads the text. The first run has every peer in
this process. The second starts one nats-server that holds each peer to its edges (the
users come from `council rights`) and `council serve` processes for the other peers;
only the peers that must stay here do (an agent whose model is this process's scripted
driver, and peers answered from a recording).

    python examples/distributed.py                     # offline: SmolLM2 reads, a driver codes
    python examples/distributed.py --model gpt-4o-mini # every peer but the runner elsewhere
    python examples/distributed.py --replay examples/cassettes/distributed.jsonl

Offline (--local, the default) the reader's process reaches SmolLM2 through litellm's
`openai/` route (OPENAI_API_BASE points at the local server); SmolLM2 cannot write
useful code, so the agent's root is a scripted driver and the agent stays in this process.
--record records the distributed run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from _shared import (
    CASSETTES,
    DRIVER,
    LOCAL,
    ExampleError,
    PromptLog,
    Stopwatch,
    code,
    guarded,
    mode,
    models_for,
    offline_models,
    parser,
    say,
    session_options,
)

from channels.permissions import Rights
from channels.server import embedded_server
from council.declare import LLM, Agent, Council, Function, Limits
from council.session import Session

HERE = Path(__file__).resolve()
CASSETTE = CASSETTES / "distributed.jsonl"
CASSETTE_TOKENS = 20_000
QUESTION = "What is the secret code for the vault? Answer with the number only."


def scan(pattern: str, context: str, width: int = 300, limit: int = 16) -> list[str]:
    """Windows of the text around each match of a regular expression (case-insensitive).

    Served as a peer, it reads the text from the shared store in its own process, so the
    caller passes a reference and never loads the text.
    """
    spots = [m.start() for m in re.finditer(pattern, context, flags=re.IGNORECASE)]
    return [context[max(0, i - width) : i + width] for i in spots[:limit]]


council = Council(
    entry="finder",
    description="finds one fact in a long text; its peers may run in other processes",
    peers=[
        Agent(
            "finder",
            model=DRIVER,
            calls=["scan", "reader"],
            description="answers a question about a very long text",
            instructions=(
                "Never load `context` yourself: pass it to `scan` (scan(pattern, "
                "context=context)) to get short windows, ask `reader` about the windows, "
                "check its answers against them, and FINAL the answer alone."
            ),
            limits=Limits(iterations=6, seconds=600),
        ),
        Function(scan),
        LLM(
            "reader",
            model=LOCAL,
            description="reads a short passage (context) and answers a question about it",
            concurrency=4,
        ),
    ],
)

# -- the scripted driver (offline only) ------------------------------------------------------

TURN_1 = """
windows = scan("secret", context=context)  # scan reads the text where it runs; we never do
print(len(windows), "windows mention 'secret'")
answers = reader.map(QUESTION, contexts=windows, max_tokens=20, temperature=0)
for a in answers:
    print(repr(a)[:80])
"""

TURN_2 = """
import re
found = []
for window, answer in zip(windows, answers):
    said = set(re.findall(r"\\d+", window))
    found += [n for n in re.findall(r"\\d{4,}", str(answer)) if n in said]
print("checked against the text:", found)
FINAL(found[0] if found else "not found")
"""


def script(turn: int, request: str, messages: list[dict[str, Any]]) -> str:
    if turn == 1:
        return code(f"QUESTION = {request!r}\n" + TURN_1, "Let scan find the places.")
    return code(TURN_2, "Keep the answers the windows confirm.")


# -- where each peer runs --------------------------------------------------------------------


def placement(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(peers run here, peers served by `council serve` processes)."""
    how = mode(args)
    here = []
    if how != "model":
        here.append("finder")  # its model is this process's driver, or the recording
    if how == "replay":
        here.append("reader")  # answered from the recording, here
    return here, [p for p in council.names() if p not in here]


@dataclass
class Served:
    peer: str
    proc: subprocess.Popen[str]
    log: Path


@dataclass
class Cluster:
    """The `council serve` processes of one distributed run."""

    served: list[Served] = field(default_factory=list)

    def stop(self) -> list[int]:
        for s in self.served:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        codes = []
        for s in self.served:
            try:
                codes.append(s.proc.wait(timeout=20))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                codes.append(s.proc.wait())
        return codes


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "council.cli", *argv]


def _env(api_base: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.setdefault("COUNCIL_LOG_LEVEL", "warning")
    env["PYTHONUNBUFFERED"] = "1"
    if api_base:  # litellm's openai/ route reads these: the reader's process finds SmolLM2
        env["OPENAI_API_BASE"] = api_base
        env["OPENAI_API_KEY"] = "sk-local"
    return env


async def serve_elsewhere(
    args: argparse.Namespace,
    peers: list[str],
    *,
    url: str,
    session: str,
    creds: Path,
    workdir: Path,
    api_base: str | None,
) -> Cluster:
    """One `council serve` process per peer; returns once every one says it is serving."""
    cluster = Cluster()
    target = f"{HERE}:council"
    try:
        for peer in peers:
            argv = ["serve", target, "--peer", peer, "--nats", url, "--session", session]
            argv += ["--rights", str(creds)]
            if args.model:
                argv += ["--model", args.model]
            elif api_base and peer == "reader":
                argv += ["--model", "openai/smollm2"]
            log = workdir / f"{peer}.log"
            proc = subprocess.Popen(  # noqa: ASYNC220 (started once; readiness read below)
                _cli(*argv),
                stdout=subprocess.PIPE,
                stderr=log.open("w"),
                text=True,
                env=_env(api_base),
                cwd=HERE.parent,
            )
            cluster.served.append(Served(peer, proc, log))
        for s in cluster.served:
            with anyio.fail_after(120):
                line = await anyio.to_thread.run_sync(s.proc.stdout.readline)  # type: ignore[union-attr]
            if "serving" not in line:
                s.proc.wait(timeout=10)
                raise ExampleError(
                    f"`council serve --peer {s.peer}` did not start (exit {s.proc.returncode}); "
                    f"its log:\n{s.log.read_text()[-2000:]}"
                )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def drivers() -> dict[str, Any]:
    """`council run ... --models examples/distributed.py:drivers`: the scripted root; the reader
    runs on SmolLM2."""
    return offline_models(script, scripted_reader=False)


def scripted() -> dict[str, Any]:
    """`council run ... --models examples/distributed.py:scripted`: no model at all (a stand-in
    reader that picks figures out of its context)."""
    return offline_models(script, scripted_reader=True)


# -- running it ------------------------------------------------------------------------------


@dataclass
class Outcome:
    in_process: Any
    distributed: Any
    expected: str
    remote: list[str]
    exit_codes: list[int]

    @property
    def ok(self) -> bool:
        return str(self.in_process) == str(self.distributed) == self.expected


async def _ask(s: Session, text: str, args: argparse.Namespace, out: Any) -> Any:
    prompts = PromptLog(["finder-model"], out=None if args.quiet else out)
    await s.start(partial(prompts.run, s.client))
    ref = await (await s.client.store()).put(text)
    return (await s.ask(QUESTION, context=ref, timeout=args.timeout)).value


async def run(
    args: argparse.Namespace,
    *,
    out: Any = sys.stdout,
    models: Any = None,
) -> Outcome:
    if models is None:
        async with models_for(args, council, script) as m:
            return await run(args, out=out, models=m)
    from needle import haystack

    text, secret = haystack(args.tokens, args.seed)
    say(args, models.label)
    say(args, f"haystack: {len(text):,} characters; the hidden code is {secret}")

    clock = Stopwatch()
    say(args, "-- every peer in this process")
    opts = {k: v for k, v in session_options(args).items() if k != "record"}  # replay only
    async with Session(models.council, models=models.models, timeout=args.timeout, **opts) as s:
        alone = await _ask(s, text, args, out)
    say(args, f"answer: {alone!r} in {clock}")

    here, there = placement(args)
    clock = Stopwatch()
    say(
        args,
        f"-- {', '.join(there)} in `council serve` processes; {', '.join(here) or 'none'} here",
    )
    with tempfile.TemporaryDirectory(prefix="council-distributed-") as tmp:
        workdir = Path(tmp)
        session = "d" + os.urandom(5).hex()
        creds = workdir / "rights"  # nats.conf, rights.json, one <peer>.cred.json per user
        made = await anyio.run_process(
            _cli("rights", f"{HERE}:council", "--session", session, "--out", str(creds)),
            env=_env(None),
            check=False,
        )
        if made.returncode != 0:
            raise ExampleError(f"`council rights` failed: {made.stderr.decode().strip()}")
        rights = Rights.load(creds)
        async with embedded_server(config_extra=made.stdout.decode()) as server:
            say(args, f"nats-server {server.url} (pid {server.pid}), one user per peer")
            cluster = await serve_elsewhere(
                args,
                there,
                url=server.url,
                session=session,
                creds=creds,
                workdir=workdir,
                api_base=models.api_base,
            )
            try:
                for sv in cluster.served:
                    say(args, f"  {sv.peer!r} is served by pid {sv.proc.pid}")
                async with Session(
                    models.council,
                    nats_url=server.url,
                    rights=rights,
                    session=session,
                    local=here,
                    models=models.models,
                    timeout=args.timeout,
                    **session_options(args),
                ) as s:
                    spread = await _ask(s, text, args, out)
            finally:
                codes = cluster.stop()
    say(args, f"answer: {spread!r} in {clock}")
    outcome = Outcome(alone, spread, secret, there, codes)
    verdict = "the same answer" if str(alone) == str(spread) else "DIFFERENT answers"
    say(args, f"{verdict} in one process and across {len(there) + 1}; the code is {secret}")
    if args.quiet:
        print(json.dumps({"in_process": alone, "distributed": spread}))
    return outcome


def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="haystack size in tokens, at four characters a token (default 100,000)",
    )
    p.add_argument("--seed", type=int, default=7, help="which haystack (and code)")
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = CASSETTE_TOKENS if mode(args) == "replay" else 100_000
    return args


def main(argv: list[str] | None = None) -> int:
    outcome = anyio.run(run, options(argv))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
