"""What hashed credentials cost: a NATS connect with a plain password in the server's config
(the v1 baseline) against bcrypt hashes at cost 4 (what channels/permissions.py writes) and
at cost 11 (`nats server passwd`'s default), on one embedded server, interleaved in rounds.
Also the time `permissions.rights()` takes to generate a council's users (hashing included).

A REPL worker connects once when it starts (and after each crash), so the connect is the
figure to hold against its start-up time (benchmarks/repl.py). The last line is one JSON
object with the medians, the ratios against the plain baseline, and library versions.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import time
from importlib.metadata import version

import anyio
import bcrypt
import nats

from channels import permissions
from channels.server import binary, embedded_server

COSTS = {"plain": None, "bcrypt4": 4, "bcrypt11": 11}


def users() -> tuple[str, dict[str, str]]:
    """The config block and each user's plain password."""
    entries, plain = [], {}
    for name, cost in COSTS.items():
        pw = secrets.token_urlsafe(24)
        stored = pw if cost is None else bcrypt.hashpw(pw.encode(), bcrypt.gensalt(cost)).decode()
        entries.append(f'{{user: "{name}", password: "{stored}"}}')
        plain[name] = pw
    return "authorization { users: [" + ", ".join(entries) + "] }", plain


def server_version() -> str:
    out = subprocess.run([str(binary()), "--version"], capture_output=True, text=True)
    return out.stdout.strip()


async def connect_ms(url: str, user: str, password: str) -> float:
    t = time.perf_counter()
    nc = await nats.connect(url, user=user, password=password)
    ms = (time.perf_counter() - t) * 1e3
    await nc.close()
    return ms


def council_edges(n: int) -> dict[str, list[str]]:
    """n agents that each call every other (the densest rights there are), with their
    REPL workers and model peers: 3n users."""
    names = [f"agent{i}" for i in range(n)]
    edges: dict[str, list[str]] = {}
    for a in names:
        calls = [b for b in names if b != a] + [f"{a}-model", f"{a}-repl"]
        edges[a] = calls
        edges[f"{a}-repl"] = list(calls)
        edges[f"{a}-model"] = []
    return edges


async def main(n: int, rounds: int, agents: int) -> dict[str, object]:
    block, plain = users()
    samples: dict[str, list[float]] = {k: [] for k in COSTS}
    async with embedded_server(config_extra=block) as server:
        for name in COSTS:  # warm up
            await connect_ms(server.url, name, plain[name])
        for _ in range(rounds):
            for name in COSTS:
                for _ in range(n):
                    samples[name].append(await connect_ms(server.url, name, plain[name]))
    med = {k: statistics.median(v) for k, v in samples.items()}
    gen = []
    for _ in range(rounds):
        t = time.perf_counter()
        r = permissions.rights("bench", council_edges(agents))
        gen.append((time.perf_counter() - t) * 1e3)
    fig: dict[str, object] = {
        "connect_plain_ms": round(med["plain"], 3),
        "connect_bcrypt4_ms": round(med["bcrypt4"], 3),
        "connect_bcrypt11_ms": round(med["bcrypt11"], 3),
        "ratio_bcrypt4_over_plain": round(med["bcrypt4"] / med["plain"], 3),
        "ratio_bcrypt11_over_plain": round(med["bcrypt11"] / med["plain"], 3),
        "rights_users": len(r.users) + 1,
        "rights_generate_ms": round(statistics.median(gen), 2),
        "connects_per_round": n,
        "rounds": rounds,
        "nats_py": version("nats-py"),
        "bcrypt": version("bcrypt"),
        "nats_server": server_version(),
    }
    for k in COSTS:
        print(f"connect {k:9s} median {med[k]:7.2f} ms  (n={len(samples[k])})")
    print(
        f"rights() for {fig['rights_users']} users (bcrypt cost "
        f"{permissions.BCRYPT_COST}): {fig['rights_generate_ms']} ms"
    )
    return fig


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connects", type=int, default=20, help="connects per user per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--agents", type=int, default=10, help="agents in the generated council")
    a = ap.parse_args()
    print(json.dumps(anyio.run(main, a.connects, a.rounds, a.agents)))
