"""The RLM agent: a model that answers by writing code in a REPL, turn by turn, until FINAL.

The loop owns control flow and limits only. What the model reads is built in
`agents.prompt`; code runs in the agent's REPL worker (`agents.repl`); the model itself
is reached through the bus as an LLM peer (`<agent>-model` by default), so that a
recording sees every completion and a replay can answer it.

Limits are enforced during sub-calls, not only between turns: each model call and
each execution carries the run's deadline and remaining budget, so a fan-out started
by code stops when the run's time is up and children spend only what is left.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus

from agents.limits import Limits
from agents.prompt import (
    LAST_TURN,
    NO_CODE,
    PeerSpec,
    code_blocks,
    describe_input,
    system_prompt,
)
from agents.repl.host import Repl
from agents.repl.protocol import ExecResult
from channels import log, subjects
from channels.bus import DEFAULT_CONCURRENCY, Bus
from channels.errors import BudgetExhausted, CallFailed, CallTimeout, DepthExceeded
from channels.messages import Budget, Call, Reply, Step, Usage, Value

_log = log.get("council.rlm")

HISTORY_NOTE = (
    "This is turn {turn} of a conversation. Earlier turns are NOT shown here: the REPL "
    "variable `history` is a list of {{'request': ..., 'answer': ...}} dicts, oldest first "
    "({n} so far). Search it with code when the request refers to earlier turns."
)


@dataclass
class _Run:
    """One request being answered: what it has spent and when it must stop."""

    call: Call
    limits: Limits
    started: float = field(default_factory=time.time)
    usage: Usage = field(default_factory=Usage)
    turns: int = 0
    last_output: str = ""

    @property
    def hard_deadline(self) -> float | None:
        """The caller's deadline: past it nobody is waiting for the answer."""
        return self.call.deadline

    @property
    def soft_deadline(self) -> float | None:
        """When the agent's own time limit asks for the last turn."""
        ends = [d for d in (self.hard_deadline, self._own_deadline) if d is not None]
        return min(ends) if ends else None

    @property
    def _own_deadline(self) -> float | None:
        return None if self.limits.seconds is None else self.started + self.limits.seconds

    def budget(self) -> Budget:
        """What sub-calls may still spend: the tighter of our limits and the caller's budget."""
        own = Budget(tokens=self.limits.tokens, cost=self.limits.cost).after(self.usage)
        if self.call.budget is None:
            return own
        theirs = self.call.budget.after(self.usage)
        return Budget(
            tokens=_tighter(own.tokens, theirs.tokens),
            cost=_tighter(own.cost, theirs.cost),
            model_calls=theirs.model_calls,
        )

    def limit_reached(self) -> str | None:
        if self.turns >= self.limits.iterations:
            return f"{self.limits.iterations} iterations"
        if self.soft_deadline is not None and time.time() >= self.soft_deadline:
            return "the time limit"
        budget = self.budget()
        if budget.tokens is not None and budget.tokens <= 0:
            return "the token budget"
        if budget.cost is not None and budget.cost <= 0:
            return "the cost budget"
        if budget.model_calls is not None and budget.model_calls <= 0:
            return "the model-call budget"
        return None


def _tighter(a: float | None, b: float | None) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclass
class _Conversation:
    repl: Repl
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    turns: int = 0


class RLMAgent:
    """A peer that answers a call by running the RLM loop in its own REPL.

    `calls` are the peers its code may call (shown to the model with their signatures);
    `model` names the LLM peer that does its thinking. With `can_spawn`, code may start
    a child agent like this one on a piece of the input (`rlm(prompt, context=...)`),
    served under `<name>-child`; past `limits.depth` such a call is refused, or becomes a
    plain model call when `limits.at_max_depth == "llm"`.

    A call whose args carry `conversation` joins that conversation: its REPL (and so its
    variables) persists between turns and earlier turns are kept in the store under a
    named variable, exposed in the REPL as `history`, never pasted into the prompt.
    """

    signature = "(prompt: str, context=None) -> Any"

    def __init__(
        self,
        name: str,
        *,
        model: str | None = None,
        calls: Sequence[PeerSpec] = (),
        limits: Limits | None = None,
        instructions: str = "",
        description: str = "",
        can_spawn: bool = False,
        concurrency: int = DEFAULT_CONCURRENCY,
        repl_options: dict[str, Any] | None = None,
        model_params: dict[str, Any] | None = None,
    ) -> None:
        self.name = subjects.check_name(name, "agent name")
        self.model = subjects.check_name(model or f"{name}-model", "model peer name")
        self.calls = list(calls)
        self.limits = limits or Limits()
        self.instructions = instructions
        self.description = description or "an agent that works through a Python REPL"
        self.can_spawn = can_spawn
        self.concurrency = concurrency
        self.repl_options = dict(repl_options or {})
        self.model_params = dict(model_params or {})  # e.g. max_tokens, temperature
        self._bus: Bus | None = None
        self._conversations: dict[str, _Conversation] = {}
        self._spare: Repl | None = None
        self._spare_wanted = anyio.Event()
        self._booting: anyio.Event | None = None  # set when the spare being started is up
        self._live = 0  # REPL workers this agent holds (each takes one of its REPL names)

    @property
    def child_name(self) -> str:
        return f"{self.name}-child"

    @property
    def repl_peers(self) -> list[PeerSpec]:
        peers = list(self.calls)
        if self.can_spawn:
            peers.append(
                PeerSpec(
                    "rlm",
                    "a child agent like you, with its own REPL; give it a piece of the input "
                    "as context",
                    "(prompt: str, context=None) -> Any",
                    target=self.child_name,
                )
            )
        return peers

    # -- serving ---------------------------------------------------------------------------

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        self._bus = bus
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(
                    partial(bus.serve, self.name, self._answer, concurrency=self.concurrency)
                )
                if self.can_spawn:
                    await tg.start(
                        partial(
                            bus.serve,
                            self.child_name,
                            self._answer_child,
                            concurrency=self.concurrency,
                        )
                    )
                tg.start_soon(self._keep_spare)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for conv in self._conversations.values():
                    await self._release(conv.repl)
                self._conversations.clear()
                if self._spare is not None:
                    await self._release(self._spare)
                    self._spare = None

    # -- REPL workers ----------------------------------------------------------------------

    async def _keep_spare(self) -> None:
        """Keep one worker booted ahead of need: a request then starts at once instead of
        paying for a Python process to start (a few hundred ms, more on a busy machine)."""
        while True:
            if self._spare is None and self._room_for_spare():
                repl = self._new_repl(None)
                booting = self._booting = anyio.Event()
                try:
                    await repl.start()
                except Exception as e:  # requests start their own; try again when one ends
                    _log.warning("rlm.spare_not_started", agent=self.name, error=str(e))
                    await self._release(repl)
                else:
                    self._spare = repl
                finally:
                    self._booting = None
                    booting.set()
            await self._spare_wanted.wait()
            self._spare_wanted = anyio.Event()

    async def warm(self) -> int | None:
        """Wait until a spare worker is booted; its pid. For callers that time requests
        (benchmarks) or start many at once; a request never has to wait for this."""
        while self._spare is None or self._spare.pid is None:
            if self._booting is not None:
                await self._booting.wait()
            else:
                await anyio.sleep(0.01)
        return self._spare.pid

    def _room_for_spare(self) -> bool:
        slots = self.repl_options.get("slots")
        return slots is None or self._live < slots

    def _new_repl(self, context: Value) -> Repl:
        self._live += 1
        return Repl(
            self._require_bus(),
            agent=self.name,
            peers=self.repl_peers,
            context=context,
            **{"exec_timeout": self.limits.execution, **self.repl_options},
        )

    async def _take_repl(self, call: Call) -> Repl:
        """The spare worker with this call's input, or a new one if none is ready.

        A spare still booting is waited for: it is up sooner than a new one would be, and
        the first request then always gets the agent's first REPL name (stable recordings).
        """
        if self._spare is None and self._booting is not None:
            await self._booting.wait()
        repl, self._spare = self._spare, None
        self._spare_wanted.set()
        if repl is None or not repl.alive:
            if repl is not None:
                await self._release(repl)
            repl = self._new_repl(None)
        # The same two steps whether a spare was ready or not, so recordings do not differ.
        await repl.start()
        await repl.set_context(call.context, parent=call)
        return repl

    async def _release(self, repl: Repl) -> None:
        with anyio.CancelScope(shield=True):
            await repl.close()
        self._live -= 1
        self._spare_wanted.set()  # a name came free: the spare may be replaced

    async def _answer_child(self, call: Call) -> Reply:
        if call.depth > self.limits.depth:
            if self.limits.at_max_depth == "llm":
                return await self._plain_model_call(call)
            raise DepthExceeded(
                f"{self.name}: a child agent at depth {call.depth} is past the limit of "
                f"{self.limits.depth}; solve this piece in your own code or with a plain model call"
            )
        return await self._answer(call)

    async def _answer(self, call: Call) -> Reply:
        if call.depth > self.limits.depth:
            raise DepthExceeded(
                f"{self.name} was called at depth {call.depth}, past its limit of {self.limits.depth}"
            )
        conversation = call.args.get("conversation")
        if conversation is None:
            repl = await self._take_repl(call)
            try:
                return await self._loop(call, repl)
            finally:
                await self._release(repl)
        conv = await self._conversation(str(conversation), call)
        async with conv.lock:
            conv.turns += 1
            history = self._history_name(str(conversation))
            await conv.repl.set_context(call.context, parent=call)
            await conv.repl.execute(
                f"history = store.lookup({history!r}, [])", parent=call, record=False
            )
            reply = await self._loop(call, conv.repl, turn=conv.turns)
            await self._remember(history, call.prompt, reply.value)
            return reply

    async def _conversation(self, conversation: str, call: Call) -> _Conversation:
        conv = self._conversations.get(conversation)
        if conv is None:
            repl = await self._take_repl(call)
            conv = self._conversations.setdefault(conversation, _Conversation(repl))
            if conv.repl is not repl:
                await self._release(repl)
        return conv

    def _history_name(self, conversation: str) -> str:
        return f"history-{self.name}-{conversation}"

    async def _remember(self, name: str, request: str, answer: Value) -> None:
        store = await self._require_bus().store()

        def add(turns: Any) -> list[Any]:
            return [*(turns or []), {"request": request, "answer": answer}]

        await store.update(name, add)

    def _require_bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError(f"agent {self.name!r} is not running; start it with run(bus)")
        return self._bus

    # -- the loop --------------------------------------------------------------------------

    async def _loop(self, call: Call, repl: Repl, *, turn: int = 0) -> Reply:
        run = _Run(call, self.limits)
        messages = [
            {"role": "system", "content": self._system_prompt()},
            {"role": "user", "content": self._first_message(call, turn)},
        ]
        reason = None
        while (reason := run.limit_reached()) is None:
            run.turns += 1
            try:
                final = await self._turn(run, repl, messages)
            except CallTimeout:
                reason = "the time limit"
                break
            except BudgetExhausted:
                reason = "the budget"
                break
            if final is not None:
                return final
        return await self._last_turn(run, repl, messages, reason)

    async def _turn(self, run: _Run, repl: Repl, messages: list[dict[str, str]]) -> Reply | None:
        bus = self._require_bus()
        await bus.publish(Step(session=bus.session, peer=self.name, call=run.call.id, n=run.turns))
        text = await self._complete(run, messages, run.soft_deadline)
        messages.append({"role": "assistant", "content": text})
        blocks = code_blocks(text)
        if not blocks:
            messages.append({"role": "user", "content": NO_CODE})
            return None
        outputs = []
        limit = self.repl_options.get("model_output_limit", 20_000) // len(blocks)
        for block in blocks:
            result = await self._execute(run, repl, block, run.soft_deadline)
            outputs.append(result.for_model(limit))
            if result.final_set:
                await bus.publish(
                    Step(
                        session=bus.session,
                        peer=self.name,
                        call=run.call.id,
                        n=run.turns,
                        phase="end",
                        detail="final",
                    )
                )
                return self._reply(run, result.final)
            if result.status in ("timeout", "crashed"):
                break  # later blocks would run in a fresh REPL without the state they expect
        run.last_output = "\n\n".join(outputs)
        messages.append({"role": "user", "content": run.last_output})
        await bus.publish(
            Step(session=bus.session, peer=self.name, call=run.call.id, n=run.turns, phase="end")
        )
        return None

    async def _last_turn(
        self, run: _Run, repl: Repl, messages: list[dict[str, str]], reason: str
    ) -> Reply:
        """One more turn asking for the answer; the run still ends as budget_exhausted."""
        messages.append({"role": "user", "content": LAST_TURN.format(reason=reason)})
        partial: Value = run.last_output or None
        deadline = run.hard_deadline if run.hard_deadline is not None else time.time() + 60
        with anyio.move_on_after(max(0.0, deadline - time.time())):
            try:
                text = await self._complete(run, messages, deadline, last=True)
                for block in code_blocks(text):
                    result = await self._execute(run, repl, block, deadline)
                    if result.final_set:
                        partial = result.final
                        break
                    partial = result.for_model(2_000)
            except CallFailed as e:
                _log.info("rlm.last_turn_failed", agent=self.name, error=str(e))
        raise BudgetExhausted(
            f"{self.name} stopped at {reason} after {run.turns} turns; the partial result is its "
            "best answer so far. Raise the agent's limits or narrow the request.",
            partial=partial,
            usage=self._usage(run),
        )

    async def _complete(
        self,
        run: _Run,
        messages: list[dict[str, str]],
        deadline: float | None,
        *,
        last: bool = False,
    ) -> str:
        bus = self._require_bus()
        call = bus.make_call(
            self.model,
            "",
            args={**self.model_params, "messages": messages},
            timeout=None if deadline is None else max(0.0, deadline - time.time()),
            parent=run.call,
        )
        # A last turn may spend what the run has left of its caller's budget, not our own limit.
        budget = run.call.budget if last else run.budget()
        call = call.model_copy(update={"budget": budget, "deadline": deadline or call.deadline})
        try:
            reply = await bus.send(call)
        except CallFailed as e:
            if e.usage:
                run.usage = run.usage + e.usage
            raise
        run.usage = run.usage + reply.usage
        value = reply.value
        return value if isinstance(value, str) else str(value)

    async def _execute(
        self, run: _Run, repl: Repl, code: str, deadline: float | None
    ) -> ExecResult:
        parent = run.call.model_copy(update={"deadline": deadline, "budget": run.budget()})
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        result = await repl.execute(code, parent=parent, timeout=timeout)
        run.usage = run.usage + result.usage
        return result

    async def _plain_model_call(self, call: Call) -> Reply:
        """At the depth limit, a child request becomes one model call over the same inputs."""
        bus = self._require_bus()
        reply = await bus.call(
            self.model, call.prompt, context=call.context, args=call.args, parent=call
        )
        return reply

    # -- what the model reads --------------------------------------------------------------

    def _system_prompt(self) -> str:
        return system_prompt(self.calls, instructions=self.instructions, can_spawn=self.can_spawn)

    def _first_message(self, call: Call, turn: int) -> str:
        parts = [f"Request: {call.prompt}", describe_input(call.context)]
        if turn > 1:
            parts.append(HISTORY_NOTE.format(turn=turn, n=turn - 1))
        return "\n\n".join(parts)

    def _reply(self, run: _Run, value: Value) -> Reply:
        return Reply(value=value, usage=self._usage(run))

    def _usage(self, run: _Run) -> Usage:
        return run.usage.model_copy(update={"wall_time": time.time() - run.started})
