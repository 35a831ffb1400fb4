"""Store put/get against nats-py's Object Store on the same embedded server, in one run.

For 1 MB, 40 MB and 200 MB values: MB/s of `Store.put` / `Store.read_bytes` next to
`ObjectStore.put` / `ObjectStore.get` (medians over rounds), and the peak memory of a
200 MB get (resident-set high-water mark above the start, and tracemalloc's peak, both
as multiples of the value size). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Awaitable
from typing import TypeVar

import anyio
import nats

from channels.server import embedded_server
from channels.store import Store

MB = 1_000_000
T = TypeVar("T")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


async def timed(op: Awaitable[T]) -> tuple[float, T]:
    t = time.perf_counter()  # a coroutine does nothing until awaited: only `op` is timed
    out = await op
    return time.perf_counter() - t, out


async def main(sizes_mb: list[int], rounds: dict[int, int], skip_obs_get_over: int) -> dict:
    figures: dict[str, float] = {}
    async with embedded_server() as srv:
        nc = await nats.connect(srv.url)
        store = await Store.open(nc, scope="bench")
        js = nc.jetstream(timeout=120)
        obs = await js.create_object_store("bench")
        for size_mb in sizes_mb:
            size = size_mb * MB
            base = bytearray(os.urandom(size))
            ours_put, ours_get, their_put, their_get = [], [], [], []
            for r in range(rounds.get(size_mb, 1)):
                base[:8] = r.to_bytes(8, "big")  # a new value each round: no dedup shortcut
                value = bytes(base)
                dt, ref = await timed(store.put(value))
                ours_put.append(size / dt / MB)
                dt, back = await timed(store.read_bytes(ref))
                assert back == value
                ours_get.append(size / dt / MB)
                del back
                await store.delete(ref)
                dt, _ = await timed(obs.put(f"v{r}", value))
                their_put.append(size / dt / MB)
                if size_mb <= skip_obs_get_over:
                    dt, res = await timed(obs.get(f"v{r}"))
                    assert res.data == value
                    their_get.append(size / dt / MB)
                    del res
                await obs.delete(f"v{r}")
                del value
                gc.collect()
            med = statistics.median
            row = {
                f"put_{size_mb}mb_mbps": med(ours_put),
                f"get_{size_mb}mb_mbps": med(ours_get),
                f"objstore_put_{size_mb}mb_mbps": med(their_put),
            }
            if their_get:
                row[f"objstore_get_{size_mb}mb_mbps"] = med(their_get)
                row[f"get_ratio_{size_mb}mb"] = med(ours_get) / med(their_get)
            row[f"put_ratio_{size_mb}mb"] = med(ours_put) / med(their_put)
            figures.update(row)
            print(
                f"{size_mb:>4} MB  store put {med(ours_put):7.0f} MB/s  get {med(ours_get):7.0f} MB/s"
                f"  | nats-py objstore put {med(their_put):7.0f} MB/s  get "
                + (f"{med(their_get):7.0f} MB/s" if their_get else "skipped"),
                flush=True,
            )

        # peak memory of the biggest get, once by RSS high-water mark, once by tracemalloc
        size = max(sizes_mb) * MB
        value = os.urandom(size)
        ref = await store.put(value)
        del value
        gc.collect()
        if _reset_peak_rss():
            start = _rss_kb("VmRSS")
            data = await store.read_bytes(ref)
            peak = _rss_kb("VmHWM")
            figures["get_peak_rss_x"] = (peak - start) * 1024 / size
            del data
            gc.collect()
        tracemalloc.start()
        data = await store.read_bytes(ref)
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del data
        figures["get_peak_traced_x"] = traced / size
        figures["peak_value_mb"] = max(sizes_mb)
        await store.delete(ref)
        print(
            f"peak memory of a {max(sizes_mb)} MB get: "
            f"{figures.get('get_peak_rss_x', float('nan')):.2f}x (RSS high-water), "
            f"{figures['get_peak_traced_x']:.2f}x (tracemalloc)"
        )
        await nc.close()
    return {k: round(v, 3) for k, v in figures.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,40,200", help="value sizes in MB, comma-separated")
    ap.add_argument(
        "--skip-objstore-get-over",
        type=int,
        default=10_000,
        help="skip nats-py's (slow) object-store get for values over this many MB",
    )
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    rounds = {1: 9, 40: 3}
    print(json.dumps(anyio.run(main, sizes, rounds, a.skip_objstore_get_over)))
