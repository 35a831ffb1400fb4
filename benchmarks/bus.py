"""Bus.call against raw nats-py request/reply on the same embedded server, in one run.

Prints sequential round-trip p50/p99, the CPU time this process spends per sequential call
(caller and callee both live here; on a loaded machine CPU time moves far less than wall
time, so it is the steadier figure to compare runs by), and throughput with many calls in
flight, sent one message per call and batched as a `.map` sends them (`Bus.send(batched=True)`:
up to 64 calls a message); the last line is one JSON object with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import anyio

from channels.bus import Bus
from channels.messages import Call
from channels.server import embedded_server


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def sequential(fn, n: int, cpu: list[float] | None = None) -> list[float]:
    times = []
    c = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t)
    if cpu is not None:
        cpu.append((time.process_time() - c) / n)
    return times


async def in_flight(fn, n: int) -> float:
    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(fn)
    return n / (time.perf_counter() - t)


async def main(n_seq: int, n_par: int, rounds: int) -> dict[str, float]:
    async with embedded_server() as srv:
        server = await Bus.connect(srv.url, session="bench", name="echo")
        client = await Bus.connect(srv.url, session="bench", name="client")
        raw_srv = await Bus.connect(srv.url, session="bench", name="raw")

        async def echo(call: Call) -> str:
            return call.prompt

        async def raw_cb(msg) -> None:
            await raw_srv.nc.publish(msg.reply, msg.data)

        await raw_srv.nc.subscribe("raw.echo", cb=raw_cb)
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: server.serve(
                    "echo", echo, concurrency=1000, task_status=task_status
                )
            )

            async def bus_call() -> None:
                await client.call("echo", "ping", timeout=30)

            async def batched_call() -> None:
                await client.send(client.make_call("echo", "ping", timeout=30), batched=True)

            async def raw_call() -> None:
                await client.nc.request("raw.echo", b"ping" * 40, timeout=30)

            # warm up both paths
            await sequential(bus_call, 200)
            await sequential(raw_call, 200)
            await in_flight(batched_call, 200)
            bus_seq, raw_seq, bus_tp, raw_tp, batched_tp = [], [], [], [], []
            bus_cpu: list[float] = []
            raw_cpu: list[float] = []
            for r in range(rounds):  # interleave so noise hits both alike
                bus_seq += await sequential(bus_call, n_seq, bus_cpu)
                raw_seq += await sequential(raw_call, n_seq, raw_cpu)
                bus_tp.append(await in_flight(bus_call, n_par))
                raw_tp.append(await in_flight(raw_call, n_par))
                batched_tp.append(await in_flight(batched_call, n_par))
                print(f"round {r + 1}/{rounds} done", flush=True)
            tg.cancel_scope.cancel()
        for b in (server, client, raw_srv):
            await b.close()

    fig = {
        "bus_p50_us": statistics.median(bus_seq) * 1e6,
        "bus_p99_us": pct(bus_seq, 0.99) * 1e6,
        "raw_p50_us": statistics.median(raw_seq) * 1e6,
        "raw_p99_us": pct(raw_seq, 0.99) * 1e6,
        "bus_cpu_us_per_call": statistics.median(bus_cpu) * 1e6,
        "raw_cpu_us_per_call": statistics.median(raw_cpu) * 1e6,
        "bus_calls_per_s": statistics.median(bus_tp),
        "raw_calls_per_s": statistics.median(raw_tp),
        "batched_calls_per_s": statistics.median(batched_tp),
        "in_flight": n_par,
    }
    fig["p50_ratio_bus_over_raw"] = fig["bus_p50_us"] / fig["raw_p50_us"]
    fig["cpu_ratio_bus_over_raw"] = fig["bus_cpu_us_per_call"] / fig["raw_cpu_us_per_call"]
    fig["throughput_ratio_bus_over_raw"] = fig["bus_calls_per_s"] / fig["raw_calls_per_s"]
    fig["throughput_ratio_batched_over_bus"] = fig["batched_calls_per_s"] / fig["bus_calls_per_s"]
    fig["throughput_ratio_batched_over_raw"] = fig["batched_calls_per_s"] / fig["raw_calls_per_s"]
    fig = {k: round(v, 3) for k, v in fig.items()}
    print(
        f"Bus.call   p50 {fig['bus_p50_us']:8.1f} us   p99 {fig['bus_p99_us']:8.1f} us   "
        f"{fig['bus_calls_per_s']:8.0f} calls/s with {n_par} in flight"
    )
    print(
        f"raw nats   p50 {fig['raw_p50_us']:8.1f} us   p99 {fig['raw_p99_us']:8.1f} us   "
        f"{fig['raw_calls_per_s']:8.0f} calls/s with {n_par} in flight"
    )
    print(
        f"batched    {fig['batched_calls_per_s']:8.0f} calls/s with {n_par} in flight "
        f"({fig['throughput_ratio_batched_over_bus']:.2f}x one message per call, "
        f"{fig['throughput_ratio_batched_over_raw']:.2f}x raw)"
    )
    print(
        f"ratio p50 {fig['p50_ratio_bus_over_raw']:.2f}x, CPU per call "
        f"{fig['bus_cpu_us_per_call']:.0f} vs {fig['raw_cpu_us_per_call']:.0f} us "
        f"({fig['cpu_ratio_bus_over_raw']:.2f}x), throughput "
        f"{fig['throughput_ratio_bus_over_raw']:.2f}x"
    )
    return fig


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=1000, help="sequential calls per round")
    ap.add_argument("--in-flight", type=int, default=1000, help="concurrent calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(anyio.run(main, a.seq, a.in_flight, a.rounds)))
