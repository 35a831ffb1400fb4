"""What watching a session costs it: the same fan-out of function calls with nobody
watching, with an app reading `session.events()`, and with OpenTelemetry spans exported
over OTLP/HTTP to a local receiver (a thread that reads and drops what it is sent).

Each round opens one session per mode (in turn, so noise hits all alike) and times one
request after a warm-up request. The last line is one JSON object with the medians, the
ratios against the unwatched baseline, and the library versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from typing import Any

import anyio

from agents.function import Peers
from council.declare import Council, Function
from council.session import Session


def leaf(text: str) -> int:
    return len(text)


async def fan(prompt: str, peers: Peers) -> int:
    n = int(prompt)
    total = 0

    async def one(i: int) -> None:
        nonlocal total
        total += await peers.leaf(f"item {i}")

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return total


COUNCIL = Council(entry="fan", peers=[Function(fan, calls=["leaf"]), Function(leaf)])


class _Sink(BaseHTTPRequestHandler):
    requests = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Sink.requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def one_round(mode: str, calls: int, url: str) -> tuple[float, int]:
    """Seconds for one request of `calls` leaf calls, and how many events/spans were seen."""
    seen = 0
    options: dict[str, Any] = {"telemetry": url} if mode == "otel" else {}
    async with Session(COUNCIL, **options) as s:
        if mode == "events":
            stream = await s.events().start()

            async def read() -> None:
                nonlocal seen
                async for e in stream:
                    seen += 1
                    del e

            s.call_in(read)
        await s.ask(str(calls // 10), timeout=120)  # warm-up
        began = time.perf_counter()
        await s.ask(str(calls), timeout=120)
        took = time.perf_counter() - began
        if mode == "events":  # every call's start and end reached the app
            expected = 2 * (calls + 1) + 2 * (calls // 10 + 1)
            with anyio.fail_after(30):
                while seen < expected:
                    await anyio.sleep(0.01)
    return took, seen


async def main(calls: int, rounds: int) -> dict[str, Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    times: dict[str, list[float]] = {"plain": [], "events": [], "otel": []}
    try:
        for r in range(rounds):
            for mode in times:
                took, _ = await one_round(mode, calls, url)
                times[mode].append(took)
            print(
                f"round {r + 1}/{rounds}: "
                + "  ".join(f"{m} {t[-1] * 1000:.0f} ms" for m, t in times.items()),
                flush=True,
            )
    finally:
        server.shutdown()
    med = {m: statistics.median(t) for m, t in times.items()}
    fig: dict[str, Any] = {
        "calls_per_request": calls,
        "rounds": rounds,
        **{f"{m}_ms": round(v * 1000, 1) for m, v in med.items()},
        "events_over_plain": round(med["events"] / med["plain"], 3),
        "otel_over_plain": round(med["otel"] / med["plain"], 3),
        "otlp_requests": _Sink.requests,
        "versions": {p: version(p) for p in ("nats-py", "pydantic", "anyio", "opentelemetry-sdk")},
    }
    for m, v in med.items():
        print(f"{m:7} median {v * 1000:8.1f} ms for {calls} calls ({calls / v:8.0f} calls/s)")
    print(
        f"ratio events/plain {fig['events_over_plain']:.2f}x, otel/plain {fig['otel_over_plain']:.2f}x"
    )
    return fig


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000, help="leaf calls in the timed request")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(anyio.run(main, a.calls, a.rounds)))
