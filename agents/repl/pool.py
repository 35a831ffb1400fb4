"""An agent's warm REPL workers: booted ahead of need, one fresh process per request.

Booting a worker (a Python process that imports the worker and sandboxes itself) costs a
few hundred ms of CPU; a request, and every child agent's request, would otherwise pay it
on its critical path, so a tree of agents gets slower with depth. The pool keeps workers
booted before they are asked for and hands each request one.

A worker serves one request (or one conversation) and is then closed, never reset and
reused: a namespace can be cleared, but not what model code did to the interpreter
around it (`codecs.register`, `sys.addaudithook`, a patched module, a thread, a write
through ctypes), and the next request may carry another user's data. A fresh process
per request is the only reset that holds against hostile code.

How many are kept warm: at least `warm`, and as many as the agent has held at once since
it was last idle (a tree of child agents holds one per agent in flight), up to `cap`.
Replacements boot after replies, and while requests still run only until one is warm:
the rest wait until the agent is idle, since a boot steals CPU from the requests beside
it. After `idle` seconds without requests, the pool shrinks back to `warm`.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from agents.repl.host import Repl
from channels import log

_log = log.get("agents.repl.pool")

IDLE_SECONDS = 60.0


class WorkerPool:
    def __init__(
        self,
        make: Callable[[], Repl],
        *,
        agent: str,
        warm: int = 1,
        cap: int | None = None,
        idle: float | None = None,
    ) -> None:
        """`make` returns a new, unstarted Repl (it takes no name until started). `cap`
        bounds the workers alive at once, held and warm (the REPL names the agent's
        rights cover); None is no bound."""
        self._make = make
        self.agent = agent
        self.warm_min = max(0, warm)
        self.cap = cap
        self.idle = IDLE_SECONDS if idle is None else idle
        self.target = self.warm_min
        self._ready: list[Repl] = []  # booted, never used; oldest first
        self._booting = 0
        self._waiting = 0  # requests waiting for a boot in progress
        self._held = 0
        self._alive = 0  # made and not yet closed: each holds a REPL name
        self._changed = anyio.Event()  # a boot ended or a worker was closed
        self._refill = anyio.Event()
        self._tg: TaskGroup | None = None
        self.boots = 0  # workers this pool started: for tests and benchmarks
        self.cold = 0  # of them, booted while a request waited (none was warm)

    # -- the keeper ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool filled until cancelled; closes every worker on the way out."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                self._refill.set()
                while True:
                    with anyio.move_on_after(self.idle if self._held == 0 else None):
                        await self._refill.wait()
                    if not self._refill.is_set():  # quiet for a while: if idle, shrink
                        if self._held == 0:
                            self._shrink()
                        continue
                    self._refill = anyio.Event()
                    if self._held and self.ready:
                        continue  # busy, one is warm: the rest boot once the work is done
                    while self._room() and len(self._ready) + self._booting < self.target:
                        self._booting += 1
                        tg.start_soon(self._boot)
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                ready, self._ready = self._ready, []
                for repl in ready:
                    await self._close(repl)

    def _room(self) -> bool:
        return self.cap is None or self._alive < self.cap

    async def _boot(self) -> None:
        repl = self._new()
        try:
            await repl.start()
        except Exception as e:  # requests boot their own; the next reply tries again
            _log.warning("pool.boot_failed", agent=self.agent, error=str(e))
            await self._close(repl)
            return
        except BaseException:
            await self._close(repl)
            raise
        finally:
            self._booting -= 1
            self._changed.set()
            self._changed = anyio.Event()
        self._ready.append(repl)
        self._signal()

    def _shrink(self) -> None:
        if self.target > self.warm_min or len(self._ready) > self.warm_min:
            self.target = self.warm_min
            extra = self._ready[self.warm_min :]
            del self._ready[self.warm_min :]
            if extra:
                _log.info("pool.shrunk", agent=self.agent, closed=len(extra), kept=self.target)
            for repl in extra:
                self._close_later(repl)

    # -- requests ------------------------------------------------------------------------

    async def take(self) -> Repl:
        """A booted worker that has run nothing: a warm one, one about to be up, or a new one."""
        while True:
            if self._ready:
                repl = self._ready.pop(0)
                if not repl.alive:  # killed from outside while it waited
                    await self._close(repl)
                    continue
                self._hold()
                return repl
            if self._booting > self._waiting:
                # One is about to be up: sooner than a new one would be.
                changed = self._changed
                self._waiting += 1
                try:
                    await changed.wait()
                finally:
                    self._waiting -= 1
                continue
            repl = self._new()
            self.cold += 1
            self._hold()
            try:
                await repl.start()
            except BaseException:
                self._held -= 1
                await self._close(repl)
                raise
            return repl

    def _hold(self) -> None:
        self._held += 1
        if self._held > self.target:
            self.target = self._held if self.cap is None else min(self._held, self.cap)

    async def give_back(self, repl: Repl) -> None:
        """The request is over: close its worker, then boot its replacement."""
        self._held -= 1
        if self._tg is None:
            await self._close(repl)
            return
        self._close_later(repl, refill=True)

    def _close_later(self, repl: Repl, *, refill: bool = False) -> None:
        assert self._tg is not None

        async def close() -> None:
            await self._close(repl)
            if refill:
                self._signal()

        self._tg.start_soon(close)

    async def wait_warm(self, n: int | None = None) -> list[Repl]:
        """Wait until `n` workers (the pool's target by default) are booted; for callers
        that time requests (benchmarks, tests). A request never has to wait for this."""
        while len(self._ready) < (self.target if n is None else n):
            changed = self._changed
            self._signal()
            for _ in range(2):  # the keeper's turn: it starts what may boot now
                await anyio.lowlevel.checkpoint()
            if not self._booting:
                break  # nothing more will boot (names all held, or busy: after the work)
            await changed.wait()
        return list(self._ready)

    # -- workers -------------------------------------------------------------------------

    def _new(self) -> Repl:
        self._alive += 1
        self.boots += 1
        return self._make()

    async def _close(self, repl: Repl) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await repl.close()
            finally:
                self._alive -= 1
                self._changed.set()
                self._changed = anyio.Event()

    def _signal(self) -> None:
        self._refill.set()

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def held(self) -> int:
        return self._held
