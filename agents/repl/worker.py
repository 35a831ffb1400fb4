"""The REPL worker: one subprocess per agent, serving "execute this code" on the bus.

    python -m agents.repl.worker [--config PATH] [--ws]

The set-up (a `WorkerConfig` as one JSON line) comes on stdin, or from a 0600 file that
is deleted once read; it carries NATS credentials, so it never goes in argv or the
environment. Once serving, the worker prints `ready` on stdout. It exits when its stdin
closes (its agent is gone) or its parent dies.

Code runs on a thread of its own so this process's event loop keeps serving: calls made
by the code travel on the loop, many at once. Start-up is paid again after every crash
or timeout, so this module imports as little as it can (no litellm, no store until used).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--ws" not in sys.argv:
    # nats-py imports aiohttp only for websocket URLs; skipping it saves a third of start-up.
    sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]

import argparse
import asyncio
import builtins
import os
import resource
import threading
import time
from functools import partial
from typing import Any

import anyio

from agents.repl import runner, sandbox
from agents.repl.capture import Bounded, NoInput, Router
from agents.repl.peers import (
    MISSING,
    Bridge,
    PeerFunction,
    StoreView,
    json_size,
    parallel,
    to_value,
)
from agents.repl.protocol import ExecResult, PeerInfo, WorkerConfig, WorkerStats
from channels import log
from channels.bus import Bus
from channels.errors import BadRequest, BudgetExhausted, CallFailed, CouncilError
from channels.messages import Call, Ref, Usage
from channels.process import die_with_parent

_log = log.get("council.repl.worker")

DEFAULT_INLINE_LIMIT = 256 * 1024
"""Bytes over which a value is put in the store and sent as a Ref, unless the bus says."""

RESERVED = frozenset(
    {"context", "store", "FINAL", "FINAL_VAR", "SHOW_VARS", "help", "parallel", "CallFailed"}
)


def function_name(peer: str) -> str:
    """The Python name a peer gets in the namespace ('code-reviewer' -> code_reviewer)."""
    return peer.replace("-", "_")


class _WorkerBus(Bus):
    """The worker's bus: every store access, including the bus's own reading back of a
    spilled reply, goes through the counting wrapper."""

    _counting: _Counting | None = None
    stats: WorkerStats

    async def store(self) -> Any:
        if self._counting is None:
            self._counting = _Counting(await super().store(), self.stats)
        return self._counting


class _Counting:
    """Wraps the store so a test can prove what the worker read (and what it never read)."""

    def __init__(self, store: Any, stats: WorkerStats):
        self._store = store
        self._stats = stats

    def _read(self, ref: Ref) -> None:
        self._stats.store_reads[ref.digest] = self._stats.store_reads.get(ref.digest, 0) + 1

    async def get(self, ref: Ref) -> Any:
        self._read(ref)
        return await self._store.get(ref)

    async def read_bytes(self, ref: Ref) -> bytes:
        self._read(ref)
        return await self._store.read_bytes(ref)

    def stream(self, ref: Ref) -> Any:
        self._read(ref)
        return self._store.stream(ref)

    async def put(self, value: Any, **kw: Any) -> Ref:
        self._stats.store_writes += 1
        return await self._store.put(value, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Worker:
    """One namespace, the loop side of the calls its code makes, and the exec handler."""

    def __init__(self, bus: Bus, config: WorkerConfig, loop: asyncio.AbstractEventLoop):
        self.bus = bus
        self.config = config
        self.bridge = Bridge(loop)
        self.stats = WorkerStats(pid=os.getpid())
        self.exec_lock = anyio.Lock()
        self.code_limiter = anyio.CapacityLimiter(1)
        self.parent: Call | None = None
        self.spent = Usage()
        self.limits: dict[str, asyncio.Semaphore] = {}
        self.in_flight: dict[str, int] = {}
        self.cells = 0
        self.final_set = False
        self.final: Any = None
        self.context_ref: Ref | None = None
        self._known: dict[int, tuple[Any, Ref]] = {}
        self.inline_limit = config.inline_limit or DEFAULT_INLINE_LIMIT
        self.stdout = Router("stdout")
        self.stderr = Router("stderr")
        self.peers = {
            function_name(p.name): PeerFunction(self, p, function_name(p.name))
            for p in config.peers
        }
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self._install()

    # -- the namespace ---------------------------------------------------------------------

    def _install(self) -> None:
        ns = self.namespace
        ns.update(self.peers)
        ns.update(
            context=None,
            store=StoreView(self),
            FINAL=self._final,
            FINAL_VAR=self._final_var,
            SHOW_VARS=self._show_vars,
            help=self._help,
            parallel=parallel,
            CallFailed=CallFailed,
        )
        self._builtin_names = set(ns) - {"context"}

    def _final(self, value: Any) -> None:
        """End the run with `value` as the answer (a big value is stored and sent as a Ref)."""
        known = self.known_ref(value)
        value = known if known is not None else to_value(value, "FINAL(value)")
        if json_size(value, self.inline_limit) > self.inline_limit:
            value = self.bridge.run(self.store_put(value))
        self.final, self.final_set = value, True
        raise runner.FinalSignal

    def _final_var(self, name: str) -> None:
        """End the run with the variable called `name` as the answer."""
        if not isinstance(name, str):
            raise TypeError(
                f"FINAL_VAR takes a variable's name as a string, e.g. FINAL_VAR('answer'); "
                f"got a {type(name).__name__}: to answer with a value, call FINAL(value)"
            )
        value = self.namespace.get(name, MISSING)
        if value is MISSING:
            defined = ", ".join(self._user_vars()) or "none"
            raise NameError(
                f"FINAL_VAR({name!r}): no variable named {name!r} (defined: {defined}); "
                "to answer with a literal value, call FINAL(value)"
            )
        self._final(value)

    def _user_vars(self) -> list[str]:
        return [
            k
            for k in self.namespace
            if not k.startswith("_") and (k not in self._builtin_names or k == "context")
        ]

    def _show_vars(self) -> None:
        """Print the variables defined so far, with their types and sizes."""
        for name in self._user_vars():
            value = self.namespace[name]
            kind = type(value).__name__
            size = ""
            if isinstance(value, Ref):
                size = f" (in the store: {value.kind}, {value.size:,} bytes)"
            elif hasattr(value, "__len__") and not isinstance(value, type):
                try:
                    size = f" (len {len(value):,})"
                except Exception:
                    size = ""
            print(f"{name}: {kind}{size}")

    def _help(self, obj: Any = MISSING) -> None:
        """List the peers code can call (or show help on one object)."""
        if obj is not MISSING:
            if isinstance(obj, PeerFunction):
                print(obj.__doc__)
                return
            import pydoc

            print(pydoc.render_doc(obj, renderer=pydoc.plaintext))
            return
        lines = ["Peers you can call (each blocks until it answers):"]
        for fn in self.peers.values():
            desc = f": {fn.info.description}" if fn.info.description else ""
            lines.append(f"  {fn.__name__}{fn.info.signature}{desc}")
        if not self.peers:
            lines.append("  (none)")
        lines += [
            "For any peer p: p.start(prompt, context=None, **args) -> handle (.result() waits);",
            "  p.map(prompts, contexts=None, raise_errors=False) -> answers in order, a failed",
            "  item is its CallFailed error object; parallel(h1, h2, ...) waits for handles.",
            "context: the input. store: put(value) -> Ref, get(ref), bind(name, value),",
            "  lookup(name, default), update(name, fn). A Ref passes a big value without reading it.",
            "SHOW_VARS(): your variables. FINAL(value) / FINAL_VAR('name'): end with the answer.",
        ]
        print("\n".join(lines))

    def known_ref(self, value: Any) -> Ref | None:
        """The Ref a value was loaded from, so forwarding it does not store it again."""
        if isinstance(value, Ref):
            return value
        hit = self._known.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else None

    def _remember(self, value: Any, ref: Ref) -> None:
        if isinstance(value, str | bytes | list | dict) and len(value) > 0:
            if len(self._known) >= 64:
                self._known.pop(next(iter(self._known)))
            self._known[id(value)] = (value, ref)

    # -- the store, opened on first use ----------------------------------------------------

    async def store(self) -> Any:
        return await self.bus.store()

    async def with_store(self, fn: Any) -> Any:
        return await fn(await self.store())

    async def store_put(self, value: Any, *, keep: bool = False) -> Ref:
        return await (await self.store()).put(value, keep=keep)

    async def store_get(self, ref: Ref) -> Any:
        value = await (await self.store()).get(ref)
        self._remember(value, ref)
        return value

    # -- calls from code (run on the loop) -------------------------------------------------

    def _limit(self, peer: PeerInfo) -> asyncio.Semaphore:
        sem = self.limits.get(peer.name)
        if sem is None:
            sem = self.limits[peer.name] = asyncio.Semaphore(peer.concurrency)
        return sem

    async def call(
        self,
        peer: PeerInfo,
        prompt: str,
        context: Any,
        args: dict[str, Any],
        *,
        batched: bool = False,
    ) -> Any:
        """One call from code, within the budget and the peer's limit; `batched` (a fan-out's
        items) lets it share a bus message with the calls to the same peer sent alongside."""
        parent = self.parent
        if parent is not None and parent.budget is not None:
            if parent.budget.after(self.spent).exhausted:
                raise BudgetExhausted(
                    f"{peer.name}() was not called: no budget is left for calls from this code "
                    f"({parent.budget.after(self.spent)}); answer from what you already have"
                )
        async with self._limit(peer):  # the limit covers storing a big context, too
            if context is not None and json_size(context, self.inline_limit) > self.inline_limit:
                context = await self.store_put(context)
            n = self.in_flight[peer.name] = self.in_flight.get(peer.name, 0) + 1
            if n > self.stats.in_flight_max.get(peer.name, 0):
                self.stats.in_flight_max[peer.name] = n
            try:
                call = self.bus.make_call(
                    peer.target, prompt, context=context, args=args, parent=parent
                )
            except CouncilError:
                raise
            except Exception as e:  # pydantic: a value that is not JSON
                raise BadRequest(f"{peer.name}(): cannot send this call: {e}") from None
            try:
                if parent is not None and parent.budget is not None:
                    call = call.model_copy(update={"budget": parent.budget.after(self.spent)})
                self.stats.calls += 1
                try:
                    reply = await self.bus.send(call, batched=batched)
                except CallFailed as e:
                    if e.usage is not None:
                        self.spent = self.spent + e.usage
                    raise
                self.spent = self.spent + reply.usage
                return reply.value
            finally:
                self.in_flight[peer.name] -= 1

    async def fan_out(
        self, items: list[tuple[PeerInfo, str, Any, dict[str, Any]]], *, raise_errors: bool
    ) -> list[Any]:
        """Every item in flight at once (each peer's limit permitting), answers in order.

        The items are sent batched: those that get their peer's slot in the same loop turn
        share one bus message (a 300-item map is a handful), each still its own call."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self.call(*item, batched=True)) for item in items]
        try:
            if raise_errors:
                pending = set(tasks)
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                    for task in tasks:  # the first failure in order, not in time
                        if task in done and task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
                return [t.result() for t in tasks]
            await asyncio.wait(tasks)
            results = []
            for t in tasks:
                e = t.exception()
                if e is None:
                    results.append(t.result())
                elif isinstance(e, CouncilError):
                    results.append(e)
                else:
                    raise e
            return results
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()

    # -- serving ---------------------------------------------------------------------------

    async def handle(self, call: Call) -> Any:
        op = call.args.get("op", "exec")
        if op == "exec":
            async with self.exec_lock:
                return (await self.execute(call)).model_dump(mode="json", by_alias=True)
        if op == "set_context":
            self.namespace["context"] = call.context
            self.context_ref = call.context if isinstance(call.context, Ref) else None
            return None
        if op == "stats":
            return self.stats.model_dump(mode="json")
        if op == "ping":
            return {"pid": os.getpid(), "agent": self.config.agent}
        raise BadRequest(
            f"{self.config.name}: unknown op {op!r}; use exec, set_context, stats or ping"
        )

    async def execute(self, call: Call) -> ExecResult:
        self.cells += 1
        self.stats.executions += 1
        self.parent = call
        self.final_set, self.final = False, None
        out, err = Bounded(self.config.output_cap), Bounded(self.config.output_cap)
        self.stdout.target, self.stderr.target = out, err
        started = time.perf_counter()
        try:
            outcome = await anyio.to_thread.run_sync(
                self._run_cell,
                call.prompt,
                f"<cell {self.cells}>",
                abandon_on_cancel=True,
                limiter=self.code_limiter,
            )
        finally:
            self.stdout.target = self.stderr.target = None
        spent, self.spent = self.spent, Usage()
        notes = []
        if outcome.error and "MemoryError" in outcome.error and self.config.memory_mb:
            notes.append(
                f"the code ran out of memory: this REPL may use about {self.config.memory_mb} MB; "
                "work on smaller pieces or hand them to a peer. Your variables are kept."
            )
        return ExecResult(
            status=outcome.status,
            stdout=out.text(),
            stderr=err.text(),
            value=outcome.value,
            error=outcome.error,
            final_set=self.final_set,
            final=self.final,
            duration=time.perf_counter() - started,
            usage=spent,
            stdout_cut=out.cut,
            stderr_cut=err.cut,
            notes=notes,
            failure=(
                outcome.failed.to_failure(call.id)
                if isinstance(outcome.failed, CallFailed)
                else None
            ),
        )

    def _run_cell(self, code: str, filename: str) -> runner.Outcome:
        """On the code thread: load `context` if this cell reads it, then run the cell."""
        if self.context_ref is not None and self.namespace.get("context") is self.context_ref:
            try:
                tree = runner.parse(code, filename)
            except (SyntaxError, ValueError):
                tree = None
            if tree is not None and runner.needs_context(tree, set(self.peers)):
                try:
                    value = self.bridge.run(self.store_get(self.context_ref))
                except Exception as e:
                    return runner.Outcome(
                        "error",
                        error=f"could not load `context` from the store: {type(e).__name__}: {e}",
                    )
                self.namespace["context"] = value
                self.context_ref = None
        return runner.run(code, self.namespace, filename=filename, value_cap=self.config.value_cap)


# -- process set-up ----------------------------------------------------------------------


def _watch_stdin(stdin: Any) -> None:
    """Exit as soon as the agent closes our stdin (or dies): nobody will call us again."""

    def watch() -> None:
        try:
            while stdin.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _limit_memory(memory_mb: int | None) -> int | None:
    """Cap the address space at what the worker already maps plus `memory_mb`."""
    if not memory_mb:
        return None
    with open("/proc/self/status") as f:
        vm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
    limit = vm + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def resolved(url: str) -> str:
    """`url` (or comma-separated URLs) with each host name replaced by its first address."""
    import socket
    from urllib.parse import urlsplit

    out = []
    for part in url.split(","):
        u = urlsplit(part.strip())
        host = u.hostname
        if host and not _is_address(host):
            try:
                addr = socket.getaddrinfo(host, u.port, type=socket.SOCK_STREAM)[0][4][0]
            except OSError:
                addr = host  # let the connect fail with the usual error
            netloc = u.netloc.rsplit("@", 1)
            at = netloc[0] + "@" if len(netloc) == 2 else ""
            bracketed = f"[{addr}]" if ":" in addr else addr
            port = f":{u.port}" if u.port else ""
            part = u._replace(netloc=f"{at}{bracketed}{port}").geturl()
        out.append(part)
    return ",".join(out)


def _is_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _read_config(path: str | None) -> tuple[WorkerConfig, Any]:
    stdin = sys.stdin.buffer
    if path:
        with open(path, "rb") as f:
            raw = f.read()
        os.unlink(path)
    else:
        raw = stdin.readline()
    if not raw.strip():
        raise SystemExit("agents.repl.worker: no config on stdin (one WorkerConfig JSON line)")
    return WorkerConfig.model_validate_json(raw), stdin


async def serve(config: WorkerConfig, sandboxed: dict[str, Any] | None = None) -> None:
    bus = await _WorkerBus.connect(
        config.url,
        session=config.session,
        name=config.name,
        user=config.user,
        password=config.password,
    )
    worker = Worker(bus, config, asyncio.get_running_loop())
    bus.stats = worker.stats
    worker.stats.sandbox = sandboxed
    sys.stdout, sys.stderr, sys.stdin = worker.stdout, worker.stderr, NoInput()
    async with anyio.create_task_group() as tg:
        key = config.key
        await tg.start(
            partial(
                bus.serve,
                config.name,
                worker.handle,
                concurrency=16,
                only=(lambda call: call.args.get("worker") == key) if key else None,
            )
        )
        worker.stats.memory_limit = _limit_memory(config.memory_mb)
        os.write(1, b"ready\n")
        # From here on, anything written to fd 1 below Python (C code, child processes) is
        # dropped rather than filling a pipe nobody reads.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agents.repl.worker", description=__doc__)
    parser.add_argument(
        "--config", help="read the WorkerConfig JSON from this file, then delete it"
    )
    parser.add_argument("--ws", action="store_true", help="the NATS URL is a websocket URL")
    args = parser.parse_args(argv)
    config, stdin = _read_config(args.config)
    # The loop thread must get the GIL back quickly when a reply arrives while code runs:
    # at the default 5 ms a blocked call's tail latency is the switch interval itself.
    sys.setswitchinterval(0.0005)
    if config.parent_pid is not None:
        die_with_parent(config.parent_pid)
    sandboxed = None
    if config.sandbox is not None:
        # Names are resolved now: once sandboxed there is no UDP, so no DNS.
        config = config.model_copy(update={"url": resolved(config.url)})
        # Before any thread starts (Landlock binds the threads started after it) and
        # before any model code: from here on this process is the sandboxed worker.
        try:
            sandboxed = sandbox.enter(config.sandbox)
        except (sandbox.SandboxError, OSError) as e:
            sys.stderr.write(f"agents.repl.worker: cannot sandbox the worker: {e}\n")
            raise SystemExit(3) from None
    _watch_stdin(stdin)
    try:
        anyio.run(serve, config, sandboxed)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
