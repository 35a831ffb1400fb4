"""The `council` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import anyio

from channels import log
from channels.bus import Bus
from channels.messages import Call, new_id
from channels.server import embedded_server


async def _demo(nats_url: str | None) -> dict[str, object]:
    """For now: start (or reach) a server, serve a peer, and make a round trip through the bus."""
    session = "demo-" + new_id()[:8]
    print(f"session {session}")

    async def run(url: str) -> dict[str, object]:
        async with (
            await Bus.connect(url, session=session, name="echo") as server,
            await Bus.connect(url, session=session, name="you") as client,
        ):

            async def echo(call: Call) -> str:
                return call.prompt.upper()

            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, "echo", echo)
                print("peer 'echo' is serving; calling it from 'you'")
                t0 = time.perf_counter()
                reply = await client.call("echo", "hello, council")
                elapsed = time.perf_counter() - t0
                print(
                    f"you -> echo: 'hello, council'  =>  {reply.value!r} in {elapsed * 1e3:.2f} ms"
                )
                tg.cancel_scope.cancel()
        return {"session": session, "reply": reply.value, "round_trip_ms": round(elapsed * 1e3, 3)}

    if nats_url:
        print(f"using NATS at {nats_url}")
        return await run(nats_url)
    async with embedded_server() as server:
        print(f"started embedded nats-server at {server.url} (pid {server.pid})")
        result = await run(server.url)
    print("stopped the embedded nats-server")
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="council", description=__doc__)
    p.add_argument("--log-level", default=None, help="debug, info, warning (default), error")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the offline demo")
    demo.add_argument(
        "--nats",
        default=os.environ.get("NATS_URL"),
        help="NATS URL to use instead of an embedded server (default: $NATS_URL)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log.configure(args.log_level)
    if args.command == "demo":
        result = anyio.run(_demo, args.nats)
        print(json.dumps(result))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
