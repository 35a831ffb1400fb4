"""Fixtures: a real nats-server for the whole run, buses on it, and helpers for processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from channels.bus import Bus
from channels.cluster import NatsCluster, running_cluster
from channels.server import NatsServer, running_server
from channels.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # nats-py is asyncio-only


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with running_server() as server:
        yield server


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server this test may restart or stop without disturbing the others."""
    with running_server() as server:
        yield server


@pytest.fixture
def session_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def connect(nats_server: NatsServer, session_id: str) -> AsyncIterator[Callable[..., object]]:
    """`await connect("name")` gives a Bus in this test's session, closed after the test."""
    opened: list[Bus] = []

    async def _connect(name: str, *, url: str | None = None, session: str | None = None) -> Bus:
        await provision_store(url or nats_server.url, session or session_id)
        bus = await Bus.connect(url or nats_server.url, session=session or session_id, name=name)
        opened.append(bus)
        return bus

    yield _connect
    for bus in opened:
        await bus.close()


def pid_alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


@asynccontextmanager
async def serving(nats_url: str, session: str, *peers: Any) -> AsyncIterator[Bus]:
    """Serve each peer object (anything with `name` and `run(bus)`) on its own connection;
    yield a client Bus named "user"; stop and close everything afterwards."""
    buses: list[Bus] = []
    await provision_store(nats_url, session)
    async with anyio.create_task_group() as tg:
        for peer in peers:
            bus = await Bus.connect(nats_url, session=session, name=peer.name)
            buses.append(bus)
            await tg.start(peer.run, bus)
        client = await Bus.connect(nats_url, session=session, name="user")
        buses.append(client)
        try:
            yield client
        finally:
            tg.cancel_scope.cancel()
    for bus in buses:
        await bus.close()


@contextmanager
def serving_elsewhere(
    target: str, peer: str, nats_url: str, session: str, *extra: str, env: dict[str, str]
) -> Iterator[subprocess.Popen[str]]:
    """`council serve target --peer peer` in a process of its own, from the moment it says it
    serves until the block ends; then stopped with SIGTERM (its exit code is `returncode`)."""
    argv = ["serve", target, "--peer", peer, "--nats", nats_url, "--session", session, *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "council.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    said: list[str] = []
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "serving" in line, proc.stderr.read() if proc.poll() is not None else line
        # Read its stderr from now on: a pipe nobody reads blocks a chatty process.
        assert proc.stderr is not None
        threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True).start()
        yield proc
    except BaseException:
        print(f"council serve --peer {peer} said:\n{''.join(said)[-4000:]}")  # shown on failure
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=20)


_provisioned: set[tuple[str, str]] = set()


async def provision_store(url: str, session: str, replicas: int | None = None) -> None:
    """Create a session's store as the runner does (peers' `Store.open` only opens it)."""
    if (url, session) in _provisioned:
        return
    nc = await nats.connect(url)
    try:
        await Store.provision(nc, scope=session, replicas=replicas)
    finally:
        await nc.close()
    _provisioned.add((url, session))


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    """Three routed nats-servers with JetStream on file storage; a test may kill nodes."""
    with running_cluster(3) as c:
        yield c
