"""What faults cost and what liveness buys, in one run against an embedded nats-server.

- time for a caller to fail 10 in-flight calls `unavailable` after the only process
  serving the callee is SIGKILLed, per heartbeat interval (and as multiples of it);
- time for a call to a peer nobody serves to fail, without and with a recorder listening
  on the session (the recorder's subscription hides nats-server's "no responders");
- calls/s of one peer with a CPU-bound handler served by 1 process and by 3 (a NATS queue
  group), and the ratio; this machine's core count bounds it;
- Bus.call p50 against a raw nats-py request in the same run (benchmarks/bus.py), with
  heartbeats and de-duplication on: compare the ratio with the one recorded before them.

The last line is one JSON object with the figures and the versions used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import anyio
import bus as bus_bench  # benchmarks/bus.py, next to this file

from channels.bus import HEARTBEAT, Bus
from channels.errors import CallFailed, Unavailable
from channels.process import spawn_tied
from channels.server import binary, embedded_server

PEER = r"""
import os, sys, time
from functools import partial
import anyio
from channels.bus import Bus

url, session, peer, ready = sys.argv[1:5]

async def handler(call):
    await anyio.sleep(call.args.get("sleep", 0))
    end = time.perf_counter() + call.args.get("spin", 0)
    while time.perf_counter() < end:  # CPU-bound: holds this process's one thread
        pass
    return os.getpid()

async def main():
    bus = await Bus.connect(url, session=session, name=peer)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(bus.serve, peer, handler, concurrency=1000))
        open(ready, "w").close()
        await anyio.sleep_forever()

anyio.run(main)
"""


class Pool:
    """`n` processes serving `peer` (one queue group)."""

    def __init__(self, url: str, session: str, peer: str, n: int, tmp: Path):
        run = uuid.uuid4().hex[:8]  # a pool per run: never an earlier run's ready file
        self.ready = [tmp / f"{session}-{peer}-{run}-{k}.ready" for k in range(n)]
        self.procs = [
            spawn_tied(
                [sys.executable, "-c", PEER, url, session, peer, str(r)], r.with_suffix(".log")
            )
            for r in self.ready
        ]

    async def wait(self) -> None:
        with anyio.fail_after(60):
            while not all(r.exists() for r in self.ready):
                await anyio.sleep(0.02)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


async def detect_dead(url: str, tmp: Path, beat: float, n: int = 10) -> float:
    session = f"dead{int(beat * 1000)}"
    pool = Pool(url, session, "victim", 1, tmp)
    client = await Bus.connect(url, session=session, name="client", heartbeat=beat)
    ended: list[float] = []
    try:
        await pool.wait()

        async def one() -> None:
            try:
                await client.call("victim", "x", args={"sleep": 3600}, timeout=3600)
            except Unavailable:
                ended.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
            await anyio.sleep(2 * beat)  # every call acknowledged and heartbeating
            pool.procs[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
    finally:
        pool.close()
        await client.close()
    assert len(ended) == n, f"{n - len(ended)} calls did not fail unavailable"
    return max(ended) - killed


async def unserved(url: str, tmp: Path, *, recorder: bool) -> float:
    from council.record import Recorder

    session = f"ghost{int(recorder)}"
    client = await Bus.connect(url, session=session, name="client")
    watcher = await Bus.connect(url, session=session, name="recorder")
    rec = Recorder(watcher.nc, session, tmp / f"{session}.jsonl") if recorder else None
    try:
        if rec:
            await rec.start()
        started = time.monotonic()
        try:
            await client.call("ghost", "anyone?", timeout=600)
        except Unavailable:
            return time.monotonic() - started
        raise AssertionError("a call to nobody was answered")
    finally:
        if rec:
            await rec.stop()
        await client.close()
        await watcher.close()


async def throughput(url: str, tmp: Path, procs: int, calls: int, spin: float) -> float:
    session = f"scale{procs}"
    pool = Pool(url, session, "cruncher", procs, tmp)
    client = await Bus.connect(url, session=session, name="client")
    try:
        await pool.wait()
        limiter = anyio.Semaphore(100)
        failed: list[CallFailed] = []

        async def one() -> None:
            async with limiter:
                try:
                    await client.call("cruncher", "x", args={"spin": spin}, timeout=600)
                except CallFailed as e:
                    failed.append(e)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(one)
        took = time.perf_counter() - started
        assert not failed, failed[:3]
        return calls / took
    finally:
        pool.close()
        await client.close()


def nats_server_version() -> str:
    out = subprocess.run([str(binary()), "--version"], capture_output=True, text=True)
    return out.stdout.strip()


async def main(a: argparse.Namespace) -> dict:
    fig: dict = {}
    with tempfile.TemporaryDirectory(prefix="council-faults-") as d:
        tmp = Path(d)
        async with embedded_server() as srv:
            for beat in a.beats:
                runs = [await detect_dead(srv.url, tmp, beat) for _ in range(a.repeat)]
                took = statistics.median(runs)
                fig[f"dead_detect_s_beat_{beat:g}"] = took
                fig[f"dead_detect_intervals_beat_{beat:g}"] = took / beat
                print(f"dead callee noticed in {took:.2f}s = {took / beat:.2f} x {beat:g}s beat")
            fig["unserved_s_no_recorder"] = await unserved(srv.url, tmp, recorder=False)
            fig["unserved_s_recorder"] = await unserved(srv.url, tmp, recorder=True)
            print(
                f"call to nobody: {fig['unserved_s_no_recorder'] * 1000:.1f} ms without a "
                f"recorder, {fig['unserved_s_recorder']:.2f}s with one (beat {HEARTBEAT:g}s)"
            )
            one = [await throughput(srv.url, tmp, 1, a.calls, a.spin) for _ in range(a.repeat)]
            three = [await throughput(srv.url, tmp, 3, a.calls, a.spin) for _ in range(a.repeat)]
            fig["calls_per_s_1_process"] = statistics.median(one)
            fig["calls_per_s_3_processes"] = statistics.median(three)
            fig["scale_out_3_over_1"] = (
                fig["calls_per_s_3_processes"] / fig["calls_per_s_1_process"]
            )
            print(
                f"{a.spin * 1000:g} ms CPU per call: {fig['calls_per_s_1_process']:.0f} calls/s "
                f"on 1 process, {fig['calls_per_s_3_processes']:.0f} on 3 "
                f"({fig['scale_out_3_over_1']:.2f}x; {os.cpu_count()} cores)"
            )
    ratio = await bus_bench.main(a.seq, a.in_flight, a.rounds)
    fig.update(ratio)  # bus_* and raw_* figures, and their ratios
    fig = {k: round(v, 4) if isinstance(v, float) else v for k, v in fig.items()}
    fig["heartbeat_default_s"] = HEARTBEAT
    fig["cores"] = os.cpu_count()
    fig["versions"] = {
        "python": platform.python_version(),
        "nats-py": version("nats-py"),
        "anyio": version("anyio"),
        "pydantic": version("pydantic"),
        "nats-server": nats_server_version(),
    }
    return fig


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--beats", type=float, nargs="+", default=[0.5, 1.0, HEARTBEAT])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calls", type=int, default=600, help="calls per throughput run")
    ap.add_argument("--spin", type=float, default=0.005, help="CPU seconds per call")
    ap.add_argument("--seq", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    print(json.dumps(anyio.run(main, ap.parse_args())))
