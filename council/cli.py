"""The `council` command: show, run and serve councils, answer as a human, trace a
recorded session, run the demo.

A council is named as FILE.py:NAME (or module:NAME); NAME defaults to `council`.
`council run` records every session into ./sessions/<session>.jsonl (--no-record to
skip); `council run --replay CASSETTE` runs it again with the models and humans answered
from the recording; `council resume CASSETTE` carries on a run that was cut short (what
the recording holds is not asked again); `council trace CASSETTE` shows who called whom,
at what cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from channels import log
from channels.bus import Bus
from channels.errors import CouncilError
from channels.messages import Ref, new_id
from channels.store import decode_value
from council.declare import load_target


async def _demo(nats_url: str | None, replay: bool = False) -> dict[str, object]:
    """The offline demo: example 1 and a small council, then their call trees (council/demo.py)."""
    from council import demo

    return await demo.run(replay=demo.wants_replay(replay), nats_url=nats_url)


SESSIONS_DIR = "sessions"  # relative to the working directory; $COUNCIL_SESSIONS overrides


def sessions_dir() -> Path:
    return Path(os.environ.get("COUNCIL_SESSIONS") or SESSIONS_DIR)


_TARGET_HELP = "the council: FILE.py:NAME or module:NAME (NAME defaults to 'council')"
_MODELS_HELP = (
    "model objects for the declaration's model strings: FILE.py:NAME or module:NAME, a dict "
    "{model string or peer name: model} or a function returning one (e.g. scripted models); "
    "a `local` or `local/...` model string it leaves out runs on SmolLM2, offline"
)


def _nats_args(
    p: argparse.ArgumentParser, *, required: bool = False, embedded: bool = True
) -> None:
    p.add_argument(
        "--nats",
        default=os.environ.get("NATS_URL"),
        required=required and not os.environ.get("NATS_URL"),
        help="NATS server URL (default: $NATS_URL"
        + ("; without one an embedded server is started)" if embedded else ")"),
    )
    p.add_argument(
        "--user", default=os.environ.get("NATS_USER"), help="NATS user (default: $NATS_USER)"
    )
    p.add_argument(
        "--password",
        default=os.environ.get("NATS_PASSWORD"),
        help="NATS password (default: $NATS_PASSWORD)",
    )
    p.add_argument(
        "--rights",
        metavar="PATH",
        default=os.environ.get("COUNCIL_RIGHTS"),
        help="the directory from `council rights` (or one <peer>.cred.json in it): each "
        "connection uses its own user (default: $COUNCIL_RIGHTS)",
    )


def _sandbox_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sandbox",
        choices=("on", "auto", "off"),
        help="the agents' REPL sandbox, over their declarations: on (refuse to run where the "
        "kernel cannot sandbox), auto (run unsandboxed there, and say so), off",
    )


def _progress_args(p: argparse.ArgumentParser) -> None:
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="print a line per agent turn, model call and code run (default when stderr is a terminal)",
    )
    shown.add_argument(
        "--quiet", "-q", dest="progress", action="store_false", help="no progress lines"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="council",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default=None, help="debug, info, warning (default), error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the offline demo: an RLM over a generated haystack and a small council",
        description="Start the embedded nats-server, run examples/needle.py and the review "
        "council with SmolLM2 as the sub-LLM (the `local` extra), or from the bundled "
        "cassettes when it is not installed, and print the call trees.",
    )
    demo.add_argument(
        "--replay",
        action="store_true",
        help="answer the models and the human from the bundled cassettes even when SmolLM2 "
        "is installed (also: COUNCIL_DEMO_REPLAY=1)",
    )
    demo.add_argument(
        "--nats",
        default=os.environ.get("NATS_URL"),
        help="NATS URL to use instead of an embedded server (default: $NATS_URL)",
    )

    show = sub.add_parser(
        "show",
        help="check a council and print it as a tree",
        description="Check a council "
        "(every problem is listed) and print who may call whom, from the entry peer down.",
    )
    show.add_argument("target", metavar="FILE:council", help=_TARGET_HELP)
    show.add_argument("--json", action="store_true", help="print the declaration as JSON")
    show.add_argument("--models", metavar="FILE:name", help=_MODELS_HELP)

    run = sub.add_parser(
        "run",
        help="start a council and ask it once",
        description="Start every peer of the council (here, on an embedded nats-server that "
        "enforces the council's edges, unless --nats is given), ask the entry peer, print the "
        "answer, and stop everything. Without --prompt, the request is read from the human's "
        "terminal (or stdin).",
    )
    run.add_argument("target", metavar="FILE:council", help=_TARGET_HELP)
    run.add_argument("--prompt", "-p", help="the request (default: read it from the terminal)")
    run.add_argument("--context", "-c", metavar="PATH", help="a file whose contents are the input")
    run.add_argument(
        "--model",
        "-m",
        help="use this model for every agent and LLM peer (`local`: SmolLM2, offline)",
    )
    run.add_argument("--models", metavar="FILE:name", help=_MODELS_HELP)
    _sandbox_arg(run)
    _nats_args(run)
    run.add_argument(
        "--replicas",
        type=int,
        help="copies of the session's store (default: 3 on a cluster of 3 or more, else 1)",
    )
    run.add_argument("--session", help="session id (default: a fresh one)")
    run.add_argument(
        "--local",
        nargs="+",
        metavar="PEER",
        help="run only these peers here (the rest are served elsewhere with `council serve`)",
    )
    run.add_argument(
        "--human",
        metavar="NAME",
        help="open the terminal endpoint for this human peer (default: the only human, if one)",
    )
    run.add_argument(
        "--no-human",
        action="store_true",
        help="open no terminal endpoint (answer with `council human`)",
    )
    run.add_argument(
        "--no-rights",
        action="store_true",
        help="start the embedded server without per-peer users (any peer may call any peer)",
    )
    run.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole request")
    recording = run.add_mutually_exclusive_group()
    recording.add_argument(
        "--record",
        metavar="PATH",
        help="write the session's cassette here (default: $COUNCIL_SESSIONS/SESSION.jsonl, "
        f"else ./{SESSIONS_DIR}/SESSION.jsonl)",
    )
    recording.add_argument("--no-record", action="store_true", help="do not record the session")
    run.add_argument(
        "--replay",
        metavar="CASSETTE",
        help="answer the LLM peers, the agents' models and the humans from this recording "
        "(agents, their code and function peers run for real); no model is called, no API "
        "key needed. Not recorded unless --record is given",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="with --replay: fail if a request differs from the recording or a recorded "
        "call is never made",
    )
    run.add_argument("--json", action="store_true", help="print the result (value, usage) as JSON")
    _progress_args(run)

    resume = sub.add_parser(
        "resume",
        help="carry on a run that was cut short, from its recording",
        description="Run the recorded council again on the recorded request: every model and "
        "human answer the cassette holds is handed out from it (no model is called for it "
        "again), the rest is asked live, and the run records on into the same cassette. For a "
        "runner that was killed or a machine that went away; a resumed run can be resumed "
        "again.",
    )
    resume.add_argument("cassette", type=Path, help="the cassette of the run to carry on")
    resume.add_argument(
        "target",
        nargs="?",
        metavar="FILE:council",
        help="the council (default: the declaration recorded in the cassette; give the file "
        "when the declaration held credentials, which are never recorded)",
    )
    resume.add_argument(
        "--context",
        "-c",
        metavar="PATH",
        help="the input file, when the run's input was too big to be recorded with its request",
    )
    resume.add_argument("--model", "-m", help="use this model for every agent and LLM peer")
    _nats_args(resume)
    resume.add_argument("--no-rights", action="store_true", help="as for `council run`")
    resume.add_argument(
        "--no-human",
        action="store_true",
        help="open no terminal endpoint for the council's human (answer with `council human`)",
    )
    resume.add_argument("--timeout", type=float, default=600.0, help="seconds for the request")
    resume.add_argument("--json", action="store_true", help="print the result as JSON")
    _progress_args(resume)

    serve = sub.add_parser(
        "serve",
        help="run one peer of a council, connected to a shared NATS server",
        description="Serve one declared peer (an agent also brings its model peer) until "
        "Ctrl-C or SIGTERM, so a council can spread over processes and machines.",
    )
    serve.add_argument("target", metavar="FILE:council", help=_TARGET_HELP)
    serve.add_argument("--peer", required=True, help="the name of the peer to serve")
    _nats_args(serve, required=True, embedded=False)
    serve.add_argument(
        "--session", required=True, help="the session id the rest of the council uses"
    )
    serve.add_argument(
        "--model", "-m", help="use this model for the peer (`local`: SmolLM2, offline)"
    )
    serve.add_argument("--models", metavar="FILE:name", help=_MODELS_HELP)
    _sandbox_arg(serve)

    rights = sub.add_parser(
        "rights",
        help="print the NATS users for a council, to configure an external server",
        description="Print the nats-server `authorization` block that holds every peer of "
        "the council to its edges in session S (include it in the server's config), and write "
        "one credential file per user (mode 0600) for --rights of run, serve and human; "
        "the server's config holds only bcrypt hashes.",
    )
    rights.add_argument("target", metavar="FILE:council", help=_TARGET_HELP)
    rights.add_argument("--session", required=True, help="the session id the rights are for")
    rights.add_argument(
        "--out",
        metavar="PATH",
        help="the directory to write the rights to (default: council-rights-SESSION): "
        "nats.conf, rights.json and one <peer>.cred.json (mode 0600) per user",
    )

    human = sub.add_parser(
        "human",
        help="answer a council's questions as a human peer, in this terminal",
        description="Show the questions waiting for human NAME (who asks, a preview of the "
        "context), read answers from stdin, and show final answers. Questions wait durably: "
        "joining late is fine, and each question is answered once.",
    )
    human.add_argument("--name", default=os.environ.get("USER", "human"), help="the human peer")
    _nats_args(human, required=True, embedded=False)
    human.add_argument("--session", required=True, help="the session id (printed by `council run`)")

    from council import trace

    trace.add_parser(sub).description = (
        "Print the call tree of a recorded session (who called whom, prompt previews, "
        "tokens, cost, time, failures); --html writes a self-contained page with a "
        "collapsible tree and a timeline."
    )
    return p


def _load_rights(path: str | None) -> Any:
    if not path:
        return None
    from channels.permissions import Rights

    if not Path(path).exists():
        raise CouncilError(f"--rights {path}: no such file; write it with `council rights`")
    return Rights.load(path)


def _rights(args: argparse.Namespace) -> int:
    from channels.permissions import rights

    council = load_target(args.target)
    r = rights(
        args.session,
        council.edges(),
        serves=council.serves(),
        slots=council.slots(),
        humans=council.desks(),
    )
    out = Path(args.out or f"council-rights-{args.session}")
    r.write(out)
    print(r.authorization(), end="")
    print(
        f"rights for session {args.session} written to {out}/ (nats.conf: hashes only; one "
        "<peer>.cred.json per user, mode 0600: give each machine only the ones it runs)",
        file=sys.stderr,
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from council.offline import load_models, problems

    council = load_target(args.target)
    print(council.to_json() if args.json else council.show())
    for model, why in problems(council, load_models(args.models) if args.models else {}).items():
        print(f"model {model!r} cannot run here: {why}", file=sys.stderr)
    return 0


def _read_context(path: str | None) -> Any:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CouncilError(f"--context {path}: no such file; give the path of the input file")
    data = p.read_bytes()
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


async def _run(args: argparse.Namespace) -> int:
    from agents.human import TerminalHuman
    from council.declare import Human
    from council.offline import load_models, models_for
    from council.session import Session

    council = load_target(args.target)
    if args.model:
        council = council.with_model(args.model)
    if args.sandbox:
        council = council.with_sandbox(args.sandbox)
    humans = [p.name for p in council.peers if isinstance(p, Human)]
    human = args.human or (humans[0] if len(humans) == 1 else None)
    if args.human and args.human not in humans:
        raise CouncilError(
            f"--human {args.human}: not a human peer of this council; its humans: "
            f"{', '.join(humans) or 'none'}"
        )
    if args.no_human:
        human = None
    endpoints = {human: TerminalHuman(human, stdout=sys.stderr)} if human else {}
    prompt = args.prompt
    if prompt is None:
        from agents.terminal import read_line

        asked = f"request{f' for {council.entry}' if council.entry else ''}> "
        prompt = (await read_line(asked, stdout=sys.stderr) or "").strip()
        if not prompt:
            raise CouncilError("no request: pass --prompt TEXT or type it at the prompt")
    context = _read_context(args.context)
    credentials = (args.user, args.password) if args.user else None
    given = _load_rights(args.rights)
    if given is not None and not args.nats:
        raise CouncilError("--rights is for an external server: pass its URL with --nats")
    if args.strict and not args.replay:
        raise CouncilError("--strict is for replays: add --replay CASSETTE")
    session = args.session or "s" + new_id()[:12]
    record: Path | None = None
    if args.record:
        record = Path(args.record)
    elif not (args.no_record or args.replay):
        record = sessions_dir() / f"{session}.jsonl"
    if args.replay:  # the recording answers for every human: no endpoint to open
        humans, endpoints, human = [], {}, None
    supplied = load_models(args.models) if args.models else {}
    async with (
        models_for(council, supplied, start=not args.replay) as models,
        Session(
            council,
            models=models,
            nats_url=args.nats,
            rights=given if given is not None else not args.no_rights,
            session=session,
            local=args.local,
            humans=endpoints,
            credentials=credentials,
            timeout=args.timeout,
            record=record,
            replay=args.replay,
            strict=args.strict,
            store_replicas=args.replicas,
        ) as s,
    ):
        print(f"session {s.session} on {s.url}", file=sys.stderr)
        if record is not None:
            print(f"recording to {record}", file=sys.stderr)
        if s.replayer is not None:
            print(f"replaying {', '.join(s.replayer.names)} from {args.replay}", file=sys.stderr)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        if progress:
            from council.progress import watch

            s.call_in(partial(watch, s.client))
        if s.rights is None and args.nats is None:
            print("rights: off (any peer may call any peer)", file=sys.stderr)
        for name in humans:  # one step to attach a person: the command, with a cred file
            join = s.human_command(name)
            if name == human:
                print(
                    f"human {name!r} is asked here; from another terminal: {join}", file=sys.stderr
                )
            else:
                print(f"human {name!r} answers with: {join}", file=sys.stderr)
        result = await s.ask(
            prompt,
            context=context,
            timeout=args.timeout,
            notify=human,
        )
    _print_result(args, result)
    if record is not None:
        print(f"recorded to {record} (show it: council trace {record})", file=sys.stderr)
    if s.replayer is not None:
        print(s.replayer.report(), file=sys.stderr)
    return 0


def _print_result(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        print(result.model_dump_json())
    else:
        value = result.value
        print(value if isinstance(value, str) else json.dumps(value, indent=2, default=str))
        u = result.usage
        cost = "unknown" if u.cost is None else f"${u.cost:.4f}"
        print(
            f"usage: {u.tokens} tokens, {u.model_calls} model calls, cost {cost}, "
            f"{u.wall_time:.2f}s",
            file=sys.stderr,
        )


async def _resume(args: argparse.Namespace) -> int:
    from channels.redact import MASK
    from council.cassette import Cassette
    from council.declare import Council
    from council.session import Session, resumed_request

    cassette = Cassette.load(args.cassette, lenient=True)
    asked = resumed_request(cassette)
    if asked is None:
        raise CouncilError(
            f"{args.cassette} holds no request to the council (the run was cut short "
            "before it was asked); start it again with `council run`"
        )
    context = asked.context
    if args.context:
        context = _read_context(args.context)
    elif isinstance(context, Ref):
        saved = cassette.ref_blob(context.digest)
        if saved is None:
            raise CouncilError(
                f"the run's input ({context!r}) was in the dead session's store and is not in "
                f"the recording; give it again: council resume {args.cassette} --context PATH"
            )
        context = decode_value(context.kind, saved)
    if args.target:
        council = load_target(args.target)
    elif cassette.header.council is None:
        raise CouncilError(
            f"{args.cassette} holds no council declaration; name it: council resume "
            f"{args.cassette} FILE.py:council"
        )
    else:
        text = json.dumps(cassette.header.council)
        if MASK in text:
            raise CouncilError(
                f"the declaration in {args.cassette} held credentials, which are never "
                f"recorded; name the council file: council resume {args.cassette} FILE.py:council"
            )
        council = Council.from_json(text)
    if args.model:
        council = council.with_model(args.model)
    given = _load_rights(args.rights)
    if given is not None and not args.nats:
        raise CouncilError("--rights is for an external server: pass its URL with --nats")
    from agents.human import TerminalHuman
    from council.declare import Human

    humans = [p.name for p in council.peers if isinstance(p, Human)]
    # a question the recording does not hold is asked here, as `council run` would
    endpoints = (
        {humans[0]: TerminalHuman(humans[0], stdout=sys.stderr)}
        if len(humans) == 1 and not args.no_human
        else {}
    )
    async with Session(
        council,
        nats_url=args.nats,
        rights=given if given is not None else not args.no_rights,
        humans=endpoints,
        local=(cassette.header.meta.get("local") or None),
        credentials=(args.user, args.password) if args.user else None,
        timeout=args.timeout,
        resume=cassette.path,
    ) as s:
        print(f"resuming session {s.session} from {args.cassette}", file=sys.stderr)
        if sys.stderr.isatty() if args.progress is None else args.progress:
            from council.progress import watch

            s.call_in(partial(watch, s.client))
        result = await s.ask(
            asked.prompt,
            context=context,
            args=asked.args or None,
            timeout=args.timeout,
            entry=asked.callee,
        )
    _print_result(args, result)
    print(f"recorded to {args.cassette} (show it: council trace {args.cassette})", file=sys.stderr)
    if s.replayer is not None:
        print(s.replayer.report(), file=sys.stderr)
    return 0


async def _serve(args: argparse.Namespace) -> int:
    from council.offline import load_models, models_for

    council = load_target(args.target)
    if args.model:
        council = council.with_model(args.model)
    if args.sandbox:
        council = council.with_sandbox(args.sandbox)
    supplied = load_models(args.models) if args.models else {}
    async with models_for(council, supplied, only=args.peer) as models:
        return await _serving(args, council, models)


async def _serving(args: argparse.Namespace, council: Any, models: dict[str, Any]) -> int:
    from council.session import serve, until_signalled

    async with anyio.create_task_group() as tg:
        await tg.start(
            partial(
                serve,
                council,
                args.peer,
                models=models,
                nats_url=args.nats,
                session=args.session,
                credentials=(args.user, args.password),
                rights=_load_rights(args.rights),
            )
        )
        print(f"serving {args.peer!r} in session {args.session} on {args.nats}", flush=True)
        await until_signalled()
        tg.cancel_scope.cancel()
    return 0


async def _human(args: argparse.Namespace) -> int:
    from agents.human import TerminalHuman
    from council.session import until_signalled

    desk = f"{args.name}-desk"
    user, password = args.user, args.password
    if (given := _load_rights(args.rights)) is not None:
        user, password = given.credentials(desk)
    async with await Bus.connect(
        args.nats, session=args.session, name=desk, user=user, password=password
    ) as bus:
        async with anyio.create_task_group() as tg:

            async def endpoint() -> None:
                await TerminalHuman(args.name).run(bus)
                tg.cancel_scope.cancel()

            tg.start_soon(endpoint)
            await until_signalled()
            tg.cancel_scope.cancel()
    return 0


def _user_error(group: BaseExceptionGroup) -> CouncilError | None:
    """The CouncilError a task group failed with, when that is all it failed with."""
    matched, rest = group.split(CouncilError)
    if matched is None or rest is not None:
        return None
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log.configure(args.log_level)
    try:
        if args.command == "demo":
            result = anyio.run(partial(_demo, args.nats, args.replay))
            print(json.dumps(result))
            return 0
        if args.command == "show":
            return _show(args)
        if args.command == "rights":
            return _rights(args)
        if args.command == "run":
            return anyio.run(_run, args)
        if args.command == "resume":
            return anyio.run(_resume, args)
        if args.command == "serve":
            return anyio.run(_serve, args)
        if args.command == "human":
            return anyio.run(_human, args)
        if args.command == "trace":
            return args.func(args)
    except CouncilError as e:
        print(f"council {args.command}: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # a task group's: one line for the user's mistake
        if group.subgroup(KeyboardInterrupt) is not None:
            print(f"council {args.command}: interrupted", file=sys.stderr)
            return 130
        error = _user_error(group)
        if error is None:
            raise
        print(f"council {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"council {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`council trace | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141  # as a shell reports a process ended by SIGPIPE
    return 2


if __name__ == "__main__":
    sys.exit(main())
