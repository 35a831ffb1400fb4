"""Store put/get against nats-py's Object Store on the same embedded server, in one run.

For 1 MB, 40 MB and 200 MB values: MB/s of `Store.put` / `Store.read_bytes` next to
`ObjectStore.put` / `ObjectStore.get` (medians over rounds), and the peak memory of a
200 MB get (resident-set high-water mark above the start, and tracemalloc's peak, both
as multiples of the value size).

On a 3-node cluster (`--cluster-rounds`, 0 to skip), with the store at 3 replicas: the
seconds of a 40 MB get and put with every node up, and started right after SIGKILL of the
node holding the stream's leader (the get is served by a follower while a new leader is
elected; the put waits for it). The last line is one JSON object with the figures and the
versions used.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import tracemalloc
from collections.abc import Awaitable
from typing import TypeVar

import anyio
import nats

from channels.cluster import running_cluster
from channels.server import binary, embedded_server
from channels.store import Store, stream_name

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
        store = await Store.provision(nc, scope="bench")
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


async def _caught_up(js, stream: str, timeout: float = 60.0) -> None:
    """Until the stream has a leader and every replica is current again."""
    with anyio.fail_after(timeout):
        while True:
            try:
                info = await js.stream_info(stream)
                replicas = info.cluster.replicas or []
                if info.cluster.leader and len(replicas) == 2 and all(r.current for r in replicas):
                    return
            except Exception:
                pass
            await anyio.sleep(0.2)


def cluster_figures(rounds: int, size_mb: int = 40) -> dict:
    """40 MB get/put on a 3-node cluster with R3 store, with all nodes up and right after the
    leader's node is SIGKILLed (then brought back and caught up before the next round)."""
    size = size_mb * MB
    with running_cluster(3) as cluster:

        async def run() -> dict:
            nc = await nats.connect(
                cluster.urls, reconnect_time_wait=0.1, max_reconnect_attempts=-1
            )
            store = await Store.provision(nc, scope="benchc", replicas=3)
            js = nc.jetstream()
            stream = stream_name("benchc")
            value = os.urandom(size)
            ref = await store.put(value)
            up_get, up_put, lost_get, lost_put = [], [], [], []
            for r in range(rounds):
                dt, back = await timed(store.read_bytes(ref))
                assert back == value
                up_get.append(dt)
                fresh = os.urandom(size)
                dt, _ = await timed(store.put(fresh))
                up_put.append(dt)
                await _caught_up(js, stream)
                leader = (await js.stream_info(stream)).cluster.leader
                cluster.kill(cluster.names().index(leader))
                dt, back = await timed(store.read_bytes(ref))
                assert back == value
                lost_get.append(dt)
                dt, _ = await timed(store.put(os.urandom(size)))
                lost_put.append(dt)
                cluster.start_node(cluster.names().index(leader))
                await _caught_up(js, stream)
                print(
                    f"cluster round {r}: 40 MB get {up_get[-1]:.2f}s up, {lost_get[-1]:.2f}s "
                    f"leader lost; put {up_put[-1]:.2f}s up, {lost_put[-1]:.2f}s leader lost",
                    flush=True,
                )
            await nc.close()
            med = statistics.median
            return {
                f"cluster_get_{size_mb}mb_s": med(up_get),
                f"cluster_get_{size_mb}mb_leader_lost_s": med(lost_get),
                f"cluster_get_{size_mb}mb_leader_lost_ratio": med(lost_get) / med(up_get),
                f"cluster_put_{size_mb}mb_s": med(up_put),
                f"cluster_put_{size_mb}mb_leader_lost_s": med(lost_put),
                "cluster_rounds": rounds,
            }

        return {k: round(v, 3) for k, v in anyio.run(run).items()}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    server = subprocess.run([str(binary()), "--version"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "nats-py": version("nats-py"),
        "nats-server": server.stdout.strip().removeprefix("nats-server: "),
        "anyio": version("anyio"),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,40,200", help="value sizes in MB, comma-separated")
    ap.add_argument(
        "--skip-objstore-get-over",
        type=int,
        default=10_000,
        help="skip nats-py's (slow) object-store get for values over this many MB",
    )
    ap.add_argument(
        "--cluster-rounds", type=int, default=3, help="leader kills on the cluster (0: skip)"
    )
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    rounds = {1: 9, 40: 3}
    figures = anyio.run(main, sizes, rounds, a.skip_objstore_get_over)
    if a.cluster_rounds:
        figures.update(cluster_figures(a.cluster_rounds))
    print(json.dumps({**figures, "versions": versions()}))
