"""The agent's side of its REPL: start the worker, send it code, restart it when it dies.

The worker is a separate process so that code which loops forever, eats memory or calls
`os._exit` costs the agent its REPL variables, never the agent itself. Every way an
execution can end comes back as an `ExecResult`; when the worker had to be replaced,
the result says so in words a model will act on (its variables are gone).
"""

from __future__ import annotations

import keyword
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from agents.prompt import PeerSpec
from agents.repl import sandbox as _sandbox
from agents.repl.env import worker_env
from agents.repl.peers import json_size
from agents.repl.protocol import (
    DEFAULT_MODEL_LIMIT,
    ExecResult,
    PeerInfo,
    WorkerConfig,
    WorkerStats,
    clip,
)
from agents.repl.worker import DEFAULT_INLINE_LIMIT, RESERVED, function_name
from channels import log, subjects
from channels.bus import Bus
from channels.errors import (
    CallFailed,
    CallTimeout,
    CouncilError,
    InvalidName,
    PeerError,
    Unavailable,
)
from channels.messages import Call, Execution, Ref, Usage, Value

_log = log.get("council.repl")

DEFAULT_EXEC_TIMEOUT = 120.0
"""Seconds one execution may run when nobody says otherwise (`Limits.execution`)."""
DEFAULT_MEMORY_MB = 2048
GRACE = 2.0  # past an execution's deadline, how long to wait for the worker's own timeout reply
EVENT_OUTPUT_LIMIT = 256_000

# Names of live workers in this process, so two REPLs of one agent never share a subject.
# An agent is served by one process per session (`council serve` runs each peer once), so
# this registry is the whole truth; asking the bus instead would cost a timeout per start
# whenever a recorder's wildcard subscription keeps the server from saying "no responders".
_taken: set[tuple[str, str]] = set()


class WorkerFailed(CouncilError, RuntimeError):
    """The REPL worker could not be started (or restarted)."""


_told: set[str] = set()  # what this process has already said about the sandbox


def sandbox_wanted(mode: str) -> bool:
    """Whether workers run sandboxed under `mode` ("on", "auto", "off") on this machine.

    "on" where the kernel cannot sandbox is an error (running unsandboxed needs the user's
    say-so); "auto" then runs unsandboxed and says so once per process, clearly.
    """
    if mode not in _sandbox.MODES:
        raise ValueError(f"sandbox={mode!r}: use 'on', 'auto' or 'off'")
    if mode == "off":
        if "off" not in _told:
            _told.add("off")
            _log.warning(
                "repl.sandbox_off",
                note="REPL code runs unsandboxed (sandbox='off'): it can read what this user "
                "can read and connect anywhere",
            )
        return False
    why = _sandbox.support()
    if why is None:
        return True
    if mode == "on":
        raise WorkerFailed(
            f"the REPL sandbox is not available here: {why}. To run model code unsandboxed "
            "anyway, declare the agent with sandbox='auto' (or 'off'), or pass --sandbox auto"
        )
    if "auto" not in _told:
        _told.add("auto")
        _log.warning(
            "repl.sandbox_unavailable",
            reason=why,
            note="sandbox='auto': REPL code runs UNSANDBOXED on this machine",
        )
    return False


def nats_ports(url: str) -> list[int]:
    """The TCP ports of a NATS URL (or comma-separated URLs) a sandboxed worker may reach."""
    from urllib.parse import urlsplit

    defaults = {"nats": 4222, "tls": 4222, "ws": 80, "wss": 443}
    ports = []
    for part in url.split(","):
        u = urlsplit(part.strip())
        ports.append(u.port or defaults.get(u.scheme, 4222))
    return ports


def peer_infos(peers: Sequence[PeerSpec]) -> list[PeerInfo]:
    """Check that every peer can be a Python function in the REPL, and say how to fix it if not."""
    import builtins

    infos, seen = [], {}
    for spec in peers:
        fn = function_name(spec.name)
        why = None
        if not fn.isidentifier() or keyword.iskeyword(fn):
            why = "is not a Python identifier"
        elif fn in RESERVED:
            why = "is one of the REPL's own names"
        elif hasattr(builtins, fn):
            why = f"would hide Python's built-in {fn}()"
        elif fn in seen:
            why = f"clashes with peer {seen[fn]!r}"
        if why:
            raise InvalidName(
                f"peer {spec.name!r} cannot be a function in the REPL: {fn!r} {why}; "
                "rename the peer (letters, digits, '_' and '-', not starting with a digit)"
            )
        seen[fn] = spec.name
        infos.append(
            PeerInfo(
                name=spec.name,
                target=getattr(spec, "target", None) or spec.name,
                description=spec.description,
                signature=spec.signature,
                concurrency=getattr(spec, "concurrency", 64),
            )
        )
    return infos


class Repl:
    """An agent's REPL: a worker subprocess serving `<agent>-repl` on the bus.

    `bus` is the agent's Bus (exec calls go over it and the worker connects to the same
    server), or a NATS URL, in which case the Repl connects as `agent` in `session`.
    `user`/`password` are the NATS credentials the worker connects with (handed to it on
    stdin, never in its environment); by default the agent's own, when given a URL.
    `logins` (REPL name -> (user, password)) gives each name its own: the worker then
    connects with the login of the name it took.

    Executions run one at a time. `exec_timeout` caps each one (a call's own deadline may
    cut it shorter); `memory_mb` is what code may allocate on top of the worker's footprint;
    `output_cap` is how many characters of stdout (and of stderr) are kept per execution.
    `sandbox` ("on", "auto" or "off", see `agents.repl.sandbox`) says whether the worker
    confines itself before running code; `sandboxed` is what this machine made of it.
    `slots` caps the names concurrent REPLs of one agent take (`<agent>-repl`, `-repl-2`, ...
    `-repl-<slots>`, the names the agent's NATS rights cover): a REPL starting while all are
    in use waits for one to be freed, up to `startup_timeout`.
    """

    def __init__(
        self,
        bus: Bus | str,
        *,
        agent: str,
        session: str | None = None,
        peers: Sequence[PeerSpec] = (),
        context: Value = None,
        exec_timeout: float | None = DEFAULT_EXEC_TIMEOUT,
        memory_mb: int | None = DEFAULT_MEMORY_MB,
        output_cap: int = 100_000,
        model_output_limit: int = DEFAULT_MODEL_LIMIT,
        name: str | None = None,
        user: str | None = None,
        password: str | None = None,
        logins: Mapping[str, tuple[str | None, str | None]] | None = None,
        startup_timeout: float = 30.0,
        inline_limit: int | None = None,
        slots: int | None = None,
        sandbox: str = "on",
        sandbox_policy: dict[str, Any] | None = None,
    ) -> None:
        self.agent = subjects.check_name(agent, "agent name")
        if isinstance(bus, Bus):
            self._bus: Bus | None = bus
            self._url = _url_of(bus)
            self.session = bus.session
            self._owns_bus = False
        else:
            if session is None:
                raise TypeError("Repl(url, ...) needs session=...; or pass the agent's Bus")
            self._bus = None
            self._url = bus
            self.session = subjects.check_name(session, "session")
            self._owns_bus = True
        self.peers = peer_infos(peers)
        self.context = context
        self.exec_timeout = exec_timeout
        self.sandboxed = sandbox_wanted(sandbox)
        self._sandbox_policy = dict(sandbox_policy or {})
        self.memory_mb = memory_mb
        self.output_cap = output_cap
        self.model_output_limit = model_output_limit
        self._wanted_name = subjects.check_name(name, "REPL name") if name else None
        self.name = ""
        self._user, self._password = user, password
        self._logins = dict(logins or {})
        self._key = ""  # the running worker's: see WorkerConfig.key
        self.startup_timeout = startup_timeout
        self._inline_limit = inline_limit
        self.slots = slots
        self._proc: Process | None = None
        self._workdir: str | None = None
        self._logdir: str | None = None  # made by the first spawn, removed by close()
        self._lock = anyio.Lock()
        self._lost: str | None = None  # a notice owed to the next execution
        self._last_loss: str | None = None
        self.restarts = 0
        self._closed = False

    # -- life cycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Repl:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the worker and return once it serves (idempotent)."""
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> None:
        if self._closed:
            raise WorkerFailed(f"the REPL of {self.agent!r} was closed; make a new Repl")
        if self._bus is None:
            self._bus = await Bus.connect(
                self._url,
                session=self.session,
                name=self.agent,
                user=self._user,
                password=self._password,
            )
        if not self.name:
            self.name = await self._pick_name()
        if self._proc is not None and self._proc.returncode is not None:
            # It died between executions (killed from outside, or by the system).
            self._lost = self._last_loss = (
                f"the REPL process had exited ({_exit_text(self._proc.returncode)})"
            )
            self.restarts += 1
            await self._kill()
        if not self.alive:
            await self._spawn()
            if self.context is not None:
                await self._send_context()

    async def _pick_name(self) -> str:
        if self._wanted_name:
            _taken.add((self.session, self._wanted_name))
            return self._wanted_name
        base = f"{self.agent}-repl"
        waited_until = time.monotonic() + self.startup_timeout
        while True:
            k = 1
            while self.slots is None or k <= self.slots:
                name = base if k == 1 else f"{base}-{k}"
                k += 1
                if (self.session, name) in _taken:
                    continue
                _taken.add((self.session, name))
                return name
            # Every name the rights cover is in use: wait for one, rather than take a name
            # the server would refuse.
            if time.monotonic() > waited_until:
                raise WorkerFailed(
                    f"all {self.slots} REPL names of agent {self.agent!r} stayed in use for "
                    f"{self.startup_timeout}s (one per request in flight, and per open "
                    "conversation); raise the agent's concurrency, or end conversations"
                )
            await anyio.sleep(0.05)

    async def _spawn(self) -> None:
        assert self._bus is not None
        self._workdir = tempfile.mkdtemp(prefix=f"council-repl-{self.agent}-")
        self._key = secrets.token_hex(8)
        limit = self._limit()
        config = WorkerConfig(
            url=self._url,
            session=self.session,
            name=self.name,
            agent=self.agent,
            user=self._logins.get(self.name, (self._user, self._password))[0],
            password=self._logins.get(self.name, (self._user, self._password))[1],
            peers=self.peers,
            memory_mb=self.memory_mb,
            output_cap=self.output_cap,
            inline_limit=limit,
            parent_pid=os.getpid(),
            key=self._key,
            sandbox=_sandbox.Policy(
                workdir=self._workdir, ports=nats_ports(self._url), **self._sandbox_policy
            )
            if self.sandboxed
            else None,
        )
        argv = [sys.executable, "-m", "agents.repl.worker"]
        if self._url.startswith("ws"):
            argv.append("--ws")
        if self._logdir is None:
            self._logdir = tempfile.mkdtemp(prefix=f"council-repl-{self.agent}-log-")
        log_path = Path(self._logdir) / "worker.log"
        started = time.perf_counter()
        # A fresh log per worker: the sandbox caps file size, and a log is a file.
        with open(log_path, "wb") as logf:  # noqa: ASYNC230 -- a local file, opened once
            proc = await anyio.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logf,
                cwd=self._workdir,
                env=worker_env(workdir=self._workdir),
            )
        self._proc = proc
        try:
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send(config.model_dump_json().encode() + b"\n")
            seen = b""
            with anyio.fail_after(self.startup_timeout):
                while b"ready\n" not in seen:
                    try:
                        seen += await proc.stdout.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        await proc.wait()
                        raise WorkerFailed(
                            f"the REPL worker of {self.agent!r} exited while starting "
                            f"({_exit_text(proc.returncode)}); its log ends:\n{self._log_tail()}"
                        ) from None
        except TimeoutError:
            await self._kill()
            raise WorkerFailed(
                f"the REPL worker of {self.agent!r} did not start within "
                f"{self.startup_timeout}s; its log ends:\n{self._log_tail()}"
            ) from None
        except BaseException:
            await self._kill()
            raise
        _log.info(
            "repl.started",
            agent=self.agent,
            name=self.name,
            pid=proc.pid,
            sandbox=self.sandboxed,
            ms=round((time.perf_counter() - started) * 1e3, 1),
        )

    async def _kill(self) -> None:
        """Stop the worker now; its namespace is lost."""
        proc, self._proc = self._proc, None
        with anyio.CancelScope(shield=True):
            if proc is not None:
                if proc.returncode is None:
                    try:
                        proc.send_signal(signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                await proc.wait()
                await proc.aclose()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def close(self) -> None:
        """Stop the worker and release everything; idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            proc = self._proc
            if proc is not None and proc.stdin is not None and proc.returncode is None:
                # Closing stdin asks the worker to exit by itself; a kill follows if it lingers.
                try:
                    await proc.stdin.aclose()
                except Exception:
                    pass
                with anyio.move_on_after(1.0):
                    await proc.wait()
            await self._kill()
            _taken.discard((self.session, self.name))
            if self._owns_bus and self._bus is not None:
                await self._bus.close()
            if self._logdir is not None:
                shutil.rmtree(self._logdir, ignore_errors=True)

    async def restart(self, reason: str = "restarted on request") -> None:
        """Replace the worker with a fresh one (the namespace is lost)."""
        async with self._lock:
            await self._kill()
            self.restarts += 1
            self._lost = self._last_loss = reason
            await self._ensure()

    # -- the context -----------------------------------------------------------------------

    async def set_context(self, context: Value, *, parent: Call | None = None) -> None:
        """Make `context` in the namespace this value (or Ref, loaded when code first reads it)."""
        async with self._lock:
            previous, self.context = self.context, context
            # None to None sends nothing, exactly as a worker started with no context: a
            # recording then looks the same whether a spare worker was ready or not.
            if self.alive and (context is not None or previous is not None):
                await self._send_context(parent)

    def _limit(self) -> int:
        """Values bigger than this travel as Refs: the bus's own spill threshold by default."""
        return self._inline_limit or getattr(self._bus, "spill_threshold", DEFAULT_INLINE_LIMIT)

    async def _send_context(self, parent: Call | None = None) -> None:
        assert self._bus is not None
        context = self.context
        limit = self._limit()
        if not isinstance(context, Ref) and json_size(context, limit) > limit:
            context = self.context = await (await self._bus.store()).put(context)
        call = self._bus.make_call(
            self.name,
            args={"op": "set_context", "worker": self._key},
            context=context,
            timeout=self.startup_timeout,
            parent=parent,
        )
        await self._bus.send(call)

    # -- executing -------------------------------------------------------------------------

    async def execute(
        self,
        code: str,
        *,
        parent: Call | None = None,
        timeout: float | None = None,
        record: bool = True,
    ) -> ExecResult:
        """Run `code` in the namespace; every ending (even the worker dying) is an ExecResult.

        Under `parent`, calls made by the code inherit its deadline, budget and trace, and
        count one level deeper than `parent`.
        """
        async with self._lock:
            await self._ensure()
            assert self._bus is not None
            # The tightest of the REPL's own limit, the caller's timeout and the deadline:
            # a deadline never lifts the execution limit (code that never ends would
            # otherwise eat the whole request, and the model would get no other turn).
            bounds = [t for t in (self.exec_timeout, timeout) if t is not None]
            if parent is not None and (left := parent.remaining()) is not None:
                bounds.append(left)
            limit = min(bounds) if bounds else DEFAULT_EXEC_TIMEOUT
            if limit <= 0:  # nothing can run, and the namespace need not be lost over it
                return ExecResult(
                    status="timeout",
                    notes=["no time was left to run this code (the deadline had passed)"],
                )
            call = self._bus.make_call(
                self.name,
                code,
                args={"op": "exec", "worker": self._key},
                timeout=limit,
                parent=parent,
            )
            if parent is not None:  # the hop into our own REPL is not a level of depth
                call = call.model_copy(update={"depth": parent.depth})
            result = await self._run(call, limit)
            if self._lost is not None:
                result = _with_note(
                    result,
                    f"the REPL was restarted before this code ran ({self._lost}); variables "
                    "defined earlier are gone",
                    lost=True,
                )
                self._lost = None
            elif self._last_loss and result.error and "NameError" in result.error:
                result = _with_note(
                    result,
                    f"a NameError may come from the REPL restart earlier ({self._last_loss}): "
                    "variables defined before it are gone",
                    lost=False,
                )
        if record:
            await self._bus.publish(
                Execution(
                    session=self._bus.session,
                    peer=self._bus.name,
                    call=call.id,
                    code=code,
                    status=result.status,
                    output=clip(result.output(), EVENT_OUTPUT_LIMIT),
                )
            )
        return result

    async def _run(self, call: Call, limit: float) -> ExecResult:
        assert self._bus is not None and self._proc is not None
        bus, proc = self._bus, self._proc
        outcome: Any = None
        started = time.perf_counter()
        try:
            async with anyio.create_task_group() as tg:

                async def request() -> None:
                    nonlocal outcome
                    try:
                        outcome = await bus.send(call)
                    except CouncilError as e:
                        outcome = e
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal outcome
                    await proc.wait()
                    await anyio.sleep(0.05)  # a reply sent just before exiting still wins
                    if outcome is None:
                        outcome = proc
                    tg.cancel_scope.cancel()

                tg.start_soon(request)
                tg.start_soon(watch)
                tg.cancel_scope.deadline = anyio.current_time() + limit + GRACE
        except BaseException:
            # Our caller gave up: the code may still be running, and nobody wants its result.
            with anyio.CancelScope(shield=True):
                await self._kill()
                self._lost = self._last_loss = "the previous execution was cancelled"
                self.restarts += 1
            raise
        elapsed = time.perf_counter() - started
        if outcome is None or isinstance(outcome, CallTimeout):
            which = (
                "the execution time limit"
                if self.exec_timeout is not None and limit >= self.exec_timeout
                else "the time left for this request"
            )
            return await self._replace(
                ExecResult(status="timeout", duration=elapsed),
                f"the code ran past {which} ({limit:.3g}s) and was stopped",
            )
        if outcome is proc or isinstance(outcome, Unavailable):
            # Not serving is as good as dead: the worker is replaced either way.
            with anyio.move_on_after(1.0):
                await proc.wait()
            return await self._replace(
                ExecResult(status="crashed", duration=elapsed, stderr=self._log_tail(2_000)),
                f"the REPL process died while running this code ({_exit_text(proc.returncode)})",
            )
        if isinstance(outcome, CallFailed):
            if outcome.kind == "cancelled":
                return await self._replace(
                    ExecResult(status="timeout", duration=elapsed, usage=outcome.usage or Usage()),
                    "the execution was cancelled",
                )
            raise outcome
        if isinstance(outcome, CouncilError):
            raise outcome
        try:
            return ExecResult.model_validate(outcome.value)
        except Exception as e:
            raise PeerError(f"the REPL worker of {self.agent!r} sent a bad result: {e}") from e

    async def _replace(self, result: ExecResult, what: str) -> ExecResult:
        """Kill and restart the worker; tell the model plainly that its variables are gone."""
        await self._kill()
        self.restarts += 1
        note = (
            f"{what}; the REPL was restarted and ALL variables were lost: recompute what you need"
        )
        self._last_loss = what
        _log.warning("repl.restarted", agent=self.agent, reason=what)
        try:
            await self._ensure()
        except WorkerFailed as e:
            note += f". Restarting failed: {e}"
        return _with_note(result, note, lost=True)

    async def stats(self) -> WorkerStats:
        """The worker's counters (executions, store reads by digest, peak calls in flight)."""
        async with self._lock:
            await self._ensure()
            assert self._bus is not None
            reply = await self._bus.call(
                self.name, args={"op": "stats", "worker": self._key}, timeout=10
            )
        return WorkerStats.model_validate(reply.value)

    def _log_tail(self, n: int = 4_000) -> str:
        if self._logdir is None:
            return ""
        try:
            text = (Path(self._logdir) / "worker.log").read_text(errors="replace")
        except OSError:
            return ""
        return text[-n:]


def _with_note(result: ExecResult, note: str, *, lost: bool) -> ExecResult:
    return result.model_copy(
        update={"notes": [*result.notes, note], "state_lost": result.state_lost or lost}
    )


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        extra = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{extra}"
    return f"exit code {code}"


def _url_of(bus: Bus) -> str:
    """The server URL the bus is connected to, without credentials."""
    url = bus.nc.connected_url
    if url is None:
        raise WorkerFailed("the agent's bus is not connected; connect it before starting a REPL")
    host = url.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{url.port}" if url.port else f"{url.scheme}://{host}"
