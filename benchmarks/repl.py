"""The REPL runtime's overheads, against a plain Bus.call measured in the same run.

- execution round trip: `repl.execute("1")` from the agent's side, p50;
- code -> peer -> code: one blocking call from inside executing code to an instant peer,
  timed inside the worker, p50 and p99 (baseline: Bus.call from the agent's process);
- fan-out: wall time of one `.map` of 1,000 calls to an instant peer (default limit 64);
- worker start: `Repl.start()` to serving, p50.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import anyio

from agents.prompt import PeerSpec
from agents.repl.host import Repl
from channels.bus import Bus
from channels.messages import Call
from channels.server import embedded_server


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


CODE_TO_PEER = """
import time
_t = []
for _ in range({n}):
    _s = time.perf_counter()
    instant('x')
    _t.append(time.perf_counter() - _s)
_t.sort()
FINAL({{"p50": _t[len(_t) // 2], "p99": _t[min(len(_t) - 1, int(0.99 * len(_t)))]}})
"""

FAN_OUT = """
import time
_s = time.perf_counter()
_out = instant.map(['x'] * {n})
assert len(_out) == {n} and _out[-1] == 'x'
time.perf_counter() - _s
"""


async def main(n_exec: int, n_calls: int, n_map: int, rounds: int) -> dict[str, float]:
    async with embedded_server() as srv:
        peer = await Bus.connect(srv.url, session="bench", name="instant")
        agent = await Bus.connect(srv.url, session="bench", name="chair")

        async def instant(call: Call) -> str:
            return call.prompt

        async with anyio.create_task_group() as tg:
            await tg.start(partial(peer.serve, "instant", instant, concurrency=1000))

            starts = []
            for _ in range(rounds):
                t = time.perf_counter()
                async with Repl(agent, agent="chair"):
                    starts.append(time.perf_counter() - t)

            baseline = []
            for _ in range(n_calls):
                t = time.perf_counter()
                await agent.call("instant", "x", timeout=10)
                baseline.append(time.perf_counter() - t)

            async with Repl(agent, agent="chair", peers=[PeerSpec("instant")]) as repl:
                await repl.execute("1")  # warm
                exec_rt = []
                for _ in range(n_exec):
                    t = time.perf_counter()
                    await repl.execute("1", record=False)
                    exec_rt.append(time.perf_counter() - t)

                result = await repl.execute(CODE_TO_PEER.format(n=n_calls), record=False)
                assert result.status == "ok", result.for_model()
                in_code = result.final

                maps = []
                for _ in range(rounds):
                    result = await repl.execute(FAN_OUT.format(n=n_map), record=False)
                    assert result.status == "ok", result.for_model()
                    maps.append(float(result.value))
            tg.cancel_scope.cancel()

    figures = {
        "worker_start_ms_p50": statistics.median(starts) * 1e3,
        "exec_round_trip_ms_p50": statistics.median(exec_rt) * 1e3,
        "code_to_peer_ms_p50": in_code["p50"] * 1e3,
        "code_to_peer_ms_p99": in_code["p99"] * 1e3,
        "bus_call_ms_p50": statistics.median(baseline) * 1e3,
        "code_to_peer_over_bus_call": in_code["p50"] / statistics.median(baseline),
        "fan_out_1000_s": statistics.median(maps),
        "fan_out_calls_per_s": n_map / statistics.median(maps),
    }
    print(f"worker start (to serving)      p50 {figures['worker_start_ms_p50']:8.1f} ms")
    print(f"execute('1') round trip        p50 {figures['exec_round_trip_ms_p50']:8.3f} ms")
    print(
        f"code -> instant peer -> code   p50 {figures['code_to_peer_ms_p50']:8.3f} ms, "
        f"p99 {figures['code_to_peer_ms_p99']:.3f} ms "
        f"({figures['code_to_peer_over_bus_call']:.2f}x a plain Bus.call, "
        f"p50 {figures['bus_call_ms_p50']:.3f} ms)"
    )
    print(
        f".map of {n_map} instant calls      {figures['fan_out_1000_s'] * 1e3:8.1f} ms "
        f"({figures['fan_out_calls_per_s']:,.0f} calls/s, per-peer limit 64)"
    )
    return {k: round(v, 4) for k, v in figures.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exec", type=int, default=300, dest="n_exec")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--map", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(anyio.run(main, args.n_exec, args.calls, args.map, args.rounds)))
