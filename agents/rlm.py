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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from agents import compaction, task
from agents.limits import Compaction, Limits
from agents.models import message_tokens
from agents.prompt import (
    FOLD_NOTE,
    LAST_TURN,
    NO_CODE,
    SUMMARY_REQUEST,
    WRONG_TYPE,
    PeerSpec,
    code_blocks,
    describe_input,
    literal_final,
    plain_final,
    system_prompt,
)
from agents.repl.host import Repl
from agents.repl.pool import WorkerPool
from agents.repl.protocol import ExecResult
from agents.schema import Mismatch, TypeSpec, signature
from channels import log, subjects
from channels.bus import DEFAULT_CONCURRENCY, Bus
from channels.errors import (
    BadRequest,
    BudgetExhausted,
    CallFailed,
    CallTimeout,
    DepthExceeded,
    PeerError,
    error_for,
)
from channels.messages import Budget, Call, Ref, Reply, Step, Usage, Value

_log = log.get("council.rlm")

UNLIMITED = 1 << 30  # a bus limit that never binds (the real limits are in the handler)

HISTORY_NOTE = (
    "This is turn {turn} of a conversation. Earlier turns are NOT shown here: the REPL "
    "variable `history` is a list of {{'request': ..., 'answer': ...}} dicts, oldest first "
    "({n} so far). Search it with code when the request refers to earlier turns."
)

CLOSING_SHARE = 0.2
"""Of the run's time, what is kept for the closing turn: working turns stop before it."""

EMPTY_RETRIES = 2
"""An empty completion is asked again this many times before the run fails with it."""

FINAL_FAILURES = frozenset({"depth_exceeded", "budget_exhausted", "bad_request"})
"""Failures that cannot succeed if tried again: uncaught in code, they end the run."""


@dataclass
class _Run:
    """One request being answered: what it has spent and when it must stop."""

    call: Call
    limits: Limits
    started: float = field(default_factory=time.time)
    usage: Usage = field(default_factory=Usage)
    turns: int = 0
    last_output: str = ""
    last_cost: float = 0.0  # the latest model call's, to foresee the next one
    last_output_tokens: int = 0
    turn_seconds: float = 0.0  # how long the latest turn took
    transcript: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""
    folded: int = 0  # turns folded into the summary so far
    repl: Any = None  # the run's REPL

    @property
    def end(self) -> float | None:
        """When the run must be over: the agent's own time limit or the caller's deadline."""
        ends = [d for d in (self.call.deadline, self._own_deadline) if d is not None]
        return min(ends) if ends else None

    @property
    def work_deadline(self) -> float | None:
        """When working turns stop, leaving the rest of the time to the closing turn."""
        end = self.end
        if end is None:
            return None
        return self.started + (end - self.started) * (1 - CLOSING_SHARE)

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

    def affordable(self, next_tokens: int, calls: int) -> str | None:
        """Which budget cannot pay for `calls` more model calls like the next one, if any."""
        budget = self.budget()
        if budget.tokens is not None and budget.tokens < next_tokens * calls:
            return "the token budget"
        if budget.cost is not None and budget.cost < max(self.last_cost * calls, 1e-12):
            return "the cost budget"
        if budget.model_calls is not None and budget.model_calls < calls:
            return "the model-call budget"
        return None

    def limit_reached(self, next_tokens: int) -> str | None:
        """Why no further working turn may start (it must leave room for the closing one)."""
        if self.turns >= self.limits.iterations:
            return f"{self.limits.iterations} iterations"
        if self.work_deadline is not None and time.time() + self.turn_seconds >= self.work_deadline:
            return "the time limit"  # or would be, if the next turn takes as long as the last
        return self.affordable(next_tokens, 2)

    def record(self, reply: str, output: str) -> None:
        self.transcript.append({"turn": self.turns, "reply": reply, "output": output})


def _summary_words(window: int) -> int:
    """How long a summary may be: a small share of the window."""
    return max(40, min(250, window // 20))


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
        output: Any = None,
        inputs: Mapping[str, Any] | None = None,
        compaction: Compaction | None = None,
        window: int | Callable[[], int | None] | None = None,
        warm: int = 1,
    ) -> None:
        """`output`: the type FINAL values must have (a pydantic model or any TypeAdapter
        type). `inputs`: types of `context` and of named args; a call that does not fit is
        refused before any model is called. `window`: the model's context window in tokens,
        or a function giving it (the model peer's, looked up once); `compaction.window`
        overrides it."""
        self.name = subjects.check_name(name, "agent name")
        self.model = subjects.check_name(model or f"{name}-model", "model peer name")
        self.calls = list(calls)
        self.limits = limits or Limits()
        self.instructions = instructions
        self.description = description or "an agent that works through a Python REPL"
        self.can_spawn = can_spawn
        self.concurrency = concurrency
        self.repl_options = dict(repl_options or {})
        self.warm_workers = warm
        self.model_params = dict(model_params or {})  # e.g. max_tokens, temperature
        self.output = TypeSpec.of(output) if output is not None else None
        self.inputs = {k: TypeSpec.of(v) for k, v in (inputs or {}).items()}
        self.compaction = compaction or Compaction()
        self._window = window
        self._window_known: int | None = None
        self._window_checked = False
        self._bus: Bus | None = None
        self._conversations: dict[str, _Conversation] = {}
        self._pool: WorkerPool | None = None
        self._child_limits: dict[int, anyio.Semaphore] = {}  # per depth: see _answer_child

    @property
    def signature(self) -> str:
        return signature(self.inputs, self.output)

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
        pool = self._pool = WorkerPool(
            partial(self._new_repl, None),
            agent=self.name,
            warm=self.warm_workers,
            cap=self.repl_options.get("slots"),
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(pool.run)
                await tg.start(
                    partial(bus.serve, self.name, self._answer, concurrency=self.concurrency)
                )
                if self.can_spawn:
                    # Limited per depth in _answer_child, not here: children waiting for a
                    # slot their own parents hold would wait forever.
                    await tg.start(
                        partial(
                            bus.serve,
                            self.child_name,
                            self._answer_child,
                            concurrency=UNLIMITED,
                        )
                    )
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for conv in self._conversations.values():
                    await pool.give_back(conv.repl)
                self._conversations.clear()

    # -- REPL workers ----------------------------------------------------------------------

    async def warm(self) -> int | None:
        """Wait until the agent's warm REPL workers are booted; the pid of the one the next
        request gets. For callers that time requests (benchmarks) or start many at once;
        a request never has to wait for this."""
        ready = await self._require_pool().wait_warm()
        return ready[0].pid if ready else None

    def _require_pool(self) -> WorkerPool:
        if self._pool is None:
            raise RuntimeError(f"agent {self.name!r} is not running")
        return self._pool

    def _new_repl(self, context: Value) -> Repl:
        return Repl(
            self._require_bus(),
            agent=self.name,
            peers=self.repl_peers,
            context=context,
            **{"exec_timeout": self.limits.execution, **self.repl_options},
        )

    async def _take_repl(self, call: Call) -> Repl:
        """A fresh worker from the pool, holding this call's input."""
        repl = await self._require_pool().take()
        try:
            await repl.set_context(call.context, parent=call)
        except BaseException:
            await self._release(repl)
            raise
        return repl

    async def _release(self, repl: Repl) -> None:
        await self._require_pool().give_back(repl)

    async def _answer_child(self, call: Call) -> Reply:
        """Child calls at each depth share `concurrency` among themselves only: were one
        limit shared by all depths, parents holding every slot would wait forever on their
        children (a tree that fans out as wide as the concurrency, two levels deep)."""
        if call.depth > self.limits.depth and self.limits.at_max_depth != "llm":
            raise DepthExceeded(
                f"{self.name}: a child agent at depth {call.depth} is past the limit of "
                f"{self.limits.depth}; solve this piece in your own code or with a plain model call"
            )
        depth = min(call.depth, self.limits.depth + 1)
        limit = self._child_limits.get(depth)
        if limit is None:
            limit = self._child_limits[depth] = anyio.Semaphore(self.concurrency)
        async with limit:
            if call.depth > self.limits.depth:
                return await self._plain_model_call(call)
            try:
                limits = self.limits.for_child(call.args, self._remaining(call))
            except ValueError as e:
                raise BadRequest(f"{self.name}: {e}") from None
            return await self._answer(call, limits)

    def _remaining(self, call: Call) -> Limits:
        """The most a child call may be given: our own limits, within the call's budget and time."""
        update: dict[str, Any] = {}
        budget = call.budget
        if budget is not None and budget.tokens is not None:
            update["tokens"] = max(1, _tighter(self.limits.tokens, budget.tokens))
        if budget is not None and budget.cost is not None:
            update["cost"] = max(1e-9, _tighter(self.limits.cost, budget.cost))
        left = call.remaining()
        if left is not None:
            update["seconds"] = max(1e-3, _tighter(self.limits.seconds, left))
        return self.limits.model_copy(update=update)

    async def _answer(self, call: Call, limits: Limits | None = None) -> Reply:
        if call.depth > self.limits.depth:
            raise DepthExceeded(
                f"{self.name} was called at depth {call.depth}, past its limit of {self.limits.depth}"
            )
        named = await self._check_inputs(call)
        if named:  # the model's code reads them as `args`, as the types gave them back
            call = call.model_copy(update={"args": {**call.args, **named}})
        limits = limits or self.limits
        conversation = call.args.get("conversation")
        if conversation is None:
            repl = await self._take_repl(call)
            try:
                return await self._loop(call, repl, limits)
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
            reply = await self._loop(call, conv.repl, limits, turn=conv.turns)
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

    # -- checking what comes in and goes out -------------------------------------------------

    async def _check_inputs(self, call: Call) -> dict[str, Any]:
        """The declared named args, checked; a call whose context or named args do not fit
        the declared types is refused before any model is called (a stored context is read
        only when its kind cannot tell)."""
        problems: list[str] = []
        named: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name == "context":
                value: Any = call.context
                if isinstance(value, Ref):
                    fits = spec.fits_ref(value)
                    if fits is True:
                        continue
                    if fits is False:
                        problems.append(f"context: a stored {value.kind} value is not {spec.name}")
                        continue
                    value = await (await self._require_bus().store()).get(value)
            elif name in call.args:
                value = call.args[name]
            else:
                value = None
            try:
                checked = spec.validate_json_value(value, name)
            except Mismatch as e:
                problems.append(str(e))
                continue
            if name != "context":
                named[name] = checked
        if problems:
            raise BadRequest(
                f"{self.name} takes {self.signature}; this call does not fit: "
                + "; ".join(problems)
                + ". Send values of the declared types."
            )
        return named

    async def _checked_final(self, value: Value) -> Value:
        """The FINAL value as the declared output type gives it back; `Mismatch` if it does
        not fit. A value the worker stored (it was big) is read back to be checked."""
        if self.output is None:
            return value
        raw = value
        if isinstance(value, Ref):
            raw = await (await self._require_bus().store()).get(value)
        return self.output.validate_json_value(raw, "FINAL value")

    # -- the loop --------------------------------------------------------------------------

    async def _loop(self, call: Call, repl: Repl, limits: Limits, *, turn: int = 0) -> Reply:
        with task.working_on(call):
            return await self._run(call, repl, limits, turn)

    async def _run(self, call: Call, repl: Repl, limits: Limits, turn: int) -> Reply:
        run = _Run(call, limits, repl=repl)
        spawn = self._spawns_at(call.depth)
        if self.can_spawn and not spawn:
            # At the depth limit a child would be refused: the model is not offered one.
            await repl.execute("globals().pop('rlm', None)", parent=call, record=False)
        if any(name != "context" for name in self.inputs):
            named = {k: call.args.get(k) for k in self.inputs if k != "context"}
            await repl.execute(f"args = {named!r}", parent=call, record=False)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": self._system_prompt(spawn)},
            {"role": "user", "content": self._first_message(call, turn)},
        ]
        reason = None
        while (reason := run.limit_reached(self._next_tokens(run, messages))) is None:
            run.turns += 1
            began = time.time()
            try:
                final = await self._turn(run, repl, messages)
            except CallTimeout:
                reason = "the time limit"
                break
            run.turn_seconds = time.time() - began
            if final is not None:
                return final
        return await self._closing_turn(run, repl, messages, reason)

    def _spawns_at(self, depth: int) -> bool:
        """Whether code at this depth may start a child agent (or its plain-model stand-in)."""
        if not self.can_spawn:
            return False
        return depth + 1 <= self.limits.depth or self.limits.at_max_depth == "llm"

    def _next_tokens(self, run: _Run, messages: list[dict[str, Any]]) -> int:
        """About what the next model call will cost in tokens: the prompt and a reply like
        the last one."""
        return message_tokens(messages) + run.last_output_tokens

    async def _turn(self, run: _Run, repl: Repl, messages: list[dict[str, Any]]) -> Reply | None:
        bus = self._require_bus()
        await bus.publish(Step(session=bus.session, peer=self.name, call=run.call.id, n=run.turns))
        text = await self._complete(run, messages, run.work_deadline)
        messages.append({"role": "assistant", "content": text})
        blocks = code_blocks(text) or [c for c in (plain_final(text),) if c]
        if not blocks:
            run.record(text, "")
            messages.append({"role": "user", "content": NO_CODE})
            return None
        outputs, full = [], []
        limit = self.repl_options.get("model_output_limit", 20_000) // len(blocks)
        for block in blocks:
            result = await self._execute(run, repl, block, run.work_deadline)
            full.append(result.output())
            if result.final_set:
                try:
                    value = await self._checked_final(result.final)
                except Mismatch as e:
                    outputs.append(result.for_model(limit))
                    outputs.append(WRONG_TYPE.format(name=self.output.name, errors=e.errors))  # type: ignore[union-attr]
                    break
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
                return self._reply(run, value)
            outputs.append(result.for_model(limit))
            self._raise_final_failure(run, result)
            if result.status in ("timeout", "crashed"):
                break  # later blocks would run in a fresh REPL without the state they expect
        run.last_output = "\n\n".join(outputs)
        run.record(text, "\n\n".join(full))
        messages.append({"role": "user", "content": run.last_output})
        await bus.publish(
            Step(session=bus.session, peer=self.name, call=run.call.id, n=run.turns, phase="end")
        )
        return None

    def _raise_final_failure(self, run: _Run, result: ExecResult) -> None:
        """End the run with a failure the code did not catch and that cannot succeed again."""
        failure = result.failure
        if failure is None or failure.kind not in FINAL_FAILURES:
            return
        if failure.kind == "budget_exhausted" and run.budget().exhausted:
            return  # our own budget ran out: the loop ends with its partial result
        error = error_for(failure)
        error.usage = self._usage(run)
        error.partial = None
        prefix = f"{self.name}: "
        if not failure.message.startswith(prefix):
            error.message = prefix + failure.message
        error.args = (error.message,)
        raise error

    async def _closing_turn(
        self, run: _Run, repl: Repl, messages: list[dict[str, Any]], reason: str
    ) -> Reply:
        """One more model call asking for the answer, within what the run has left; its code
        may compute FINAL from what is there but calls no peer. The run still ends as
        budget_exhausted, with that answer (or the latest output) as the partial result."""
        partial: Value = run.last_output or None
        end = run.end
        left = None if end is None else end - time.time()
        closing = LAST_TURN.format(reason=reason)
        if messages[-1]["role"] == "user":
            messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{closing}"}
        else:
            messages.append({"role": "user", "content": closing})
        short = run.affordable(self._next_tokens(run, messages), 1)
        if short is None and (left is None or left > 0):
            with anyio.move_on_after(left if left is not None else float("inf")):
                try:
                    text = await self._complete(run, messages, end, closing=True)
                    blocks = code_blocks(text) or [c for c in (plain_final(text),) if c]
                    for block in blocks:
                        literal, value = literal_final(block)
                        if literal:
                            partial = await self._closing_value(value)
                            break
                        result = await self._execute(run, repl, block, end, closing=True)
                        if result.final_set:
                            partial = await self._closing_value(result.final)
                            break
                        partial = result.for_model(2_000)
                except CallFailed as e:
                    _log.info("rlm.closing_turn_failed", agent=self.name, error=str(e))
        else:
            _log.info("rlm.no_closing_turn", agent=self.name, why=short or "no time left")
        raise BudgetExhausted(
            f"{self.name} stopped at {reason} after {run.turns} turns; the partial result is its "
            "best answer so far. Raise the agent's limits or narrow the request.",
            partial=partial,
            usage=self._usage(run),
        )

    async def _closing_value(self, value: Any) -> Value:
        """The closing turn's answer: of the declared type if it fits, as given if not."""
        try:
            return await self._checked_final(value)
        except Mismatch:
            return value

    async def _complete(
        self,
        run: _Run,
        messages: list[dict[str, Any]],
        deadline: float | None,
        *,
        closing: bool = False,
    ) -> str:
        """One completion of the root model; an empty one is asked again, then fails typed."""
        await self._compact(run, messages, deadline)
        args: dict[str, Any] = {**self.model_params, "messages": messages}
        cap = self._max_tokens(run, messages)
        if cap is not None:
            args["max_tokens"] = cap
        for attempt in range(EMPTY_RETRIES + 1):
            reply = await self._ask(self.model, args, run, deadline)
            text = reply.value if isinstance(reply.value, str) else str(reply.value or "")
            if text.strip():
                run.last_output_tokens = reply.usage.output_tokens
                return text
            _log.info("rlm.empty_completion", agent=self.name, attempt=attempt + 1)
        raise PeerError(
            f"{self.name}: its model {self.model!r} returned an empty completion "
            f"{EMPTY_RETRIES + 1} times in a row; check the model (a max_tokens too small, a "
            "content filter, a server that dropped the reply) or use another one",
            usage=self._usage(run),
        )

    async def _ask(
        self, peer: str, args: dict[str, Any], run: _Run, deadline: float | None
    ) -> Reply:
        """A model call under this run, its spending added to the run's."""
        bus = self._require_bus()
        call = bus.make_call(
            peer,
            "",
            args=args,
            timeout=None if deadline is None else max(0.0, deadline - time.time()),
            parent=run.call,
        )
        call = call.model_copy(
            update={"budget": run.budget(), "deadline": deadline or call.deadline}
        )
        try:
            reply = await bus.send(call)
        except CallFailed as e:
            if e.usage:
                run.usage = run.usage + e.usage
            raise
        run.usage = run.usage + reply.usage
        if reply.usage.cost is not None:
            run.last_cost = reply.usage.cost
        return reply

    def _max_tokens(self, run: _Run, messages: list[dict[str, Any]]) -> int | None:
        """With a token budget, the reply may use only what the prompt leaves of it."""
        left = run.budget().tokens
        asked = self.model_params.get("max_tokens")
        if left is None:
            return None
        room = max(1, left - message_tokens(messages))
        return room if asked is None else min(int(asked), room)

    async def _execute(
        self, run: _Run, repl: Repl, code: str, deadline: float | None, *, closing: bool = False
    ) -> ExecResult:
        budget = run.budget()
        if closing:  # the closing turn computes an answer from what is there: no peer calls
            budget = budget.model_copy(update={"model_calls": 0})
        parent = run.call.model_copy(update={"deadline": deadline, "budget": budget})
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        result = await repl.execute(code, parent=parent, timeout=timeout)
        run.usage = run.usage + result.usage
        return result

    # -- compaction --------------------------------------------------------------------------

    async def window(self) -> int | None:
        """The root model's context window in tokens: declared, or the model peer's own."""
        if self.compaction.window is not None:
            return self.compaction.window
        if not self._window_checked:  # once: a lookup in litellm's table may import it
            source = self._window
            if callable(source):
                self._window_known = await anyio.to_thread.run_sync(source)
            else:
                self._window_known = source
            self._window_checked = True
        return self._window_known

    async def _compact(
        self, run: _Run, messages: list[dict[str, Any]], deadline: float | None
    ) -> None:
        """Fold older turns when this prompt would pass its share of the window."""
        if not self.compaction.enabled:
            return
        window = await self.window()
        if window is None:
            return
        reserve = int(self.model_params.get("max_tokens") or 0)
        limit = int(window * self.compaction.at) - reserve
        before = message_tokens(messages)
        if before <= limit:
            return
        target = int(window * self.compaction.at * 0.6) - reserve
        head = self._head(messages[1]["content"])
        words = _summary_words(window)
        note = len(FOLD_NOTE) + words * 8
        fold = compaction.plan(messages, head, self.compaction.keep, target, note)
        if fold.older:
            try:
                run.summary = await self._summarise(run, fold.older, words, window, deadline)
            except CallFailed as e:  # the transcript still holds every turn: fold anyway
                _log.warning("rlm.summary_failed", agent=self.name, error=str(e))
                run.summary = f"(no summary: the summariser failed: {e.kind}); {run.summary}"
            run.folded += len(fold.older)
        messages[:] = compaction.folded(
            messages[0], head, run.summary, run.folded, fold.kept, target
        )
        await self._publish_transcript(run)
        bus = self._require_bus()
        after = message_tokens(messages)
        detail = f"compacted: turns 1-{run.folded} folded, about {before:,} -> {after:,} tokens"
        await bus.publish(
            Step(session=bus.session, peer=self.name, call=run.call.id, n=run.turns, detail=detail)
        )
        _log.info("rlm.compacted", agent=self.name, folded=run.folded, before=before, after=after)

    @staticmethod
    def _head(first: str) -> str:
        """The first user message without an earlier fold note."""
        cut = first.find("\n\n[Turns 1 to ")
        return first if cut < 0 else first[:cut]

    async def _summarise(
        self,
        run: _Run,
        older: list[compaction.Pair],
        words: int,
        window: int,
        deadline: float | None,
    ) -> str:
        room = int(window * 0.6) - words * 2
        earlier = f"Summary of still earlier turns: {run.summary}\n\n" if run.summary else ""
        messages = [
            {
                "role": "system",
                "content": "You condense an agent's working notes so it can carry on with less.",
            },
            {"role": "user", "content": earlier + compaction.turns_text(older, room)},
            {"role": "user", "content": SUMMARY_REQUEST.format(words=words)},
        ]
        peer = self.compaction.model or self.model
        reply = await self._ask(
            peer, {"messages": messages, "max_tokens": words * 2}, run, deadline
        )
        text = reply.value if isinstance(reply.value, str) else str(reply.value)
        return text.strip()[: words * 8]

    async def _publish_transcript(self, run: _Run) -> None:
        """Every turn so far, as `transcript` in the REPL (through a named store variable)."""
        store = await self._require_bus().store()
        name = f"transcript-{self.name}-{run.call.id}"
        await store.bind(name, run.transcript)
        await run.repl.execute(
            f"transcript = store.lookup({name!r}, [])", parent=run.call, record=False
        )

    async def _plain_model_call(self, call: Call) -> Reply:
        """At the depth limit, a child request becomes one model call over the same inputs."""
        bus = self._require_bus()
        reply = await bus.call(
            self.model, call.prompt, context=call.context, args=call.args, parent=call
        )
        return reply

    # -- what the model reads --------------------------------------------------------------

    def _system_prompt(self, spawn: bool) -> str:
        return system_prompt(
            self.calls,
            instructions=self.instructions,
            can_spawn=spawn,
            output=self.output.describe() if self.output else None,
        )

    def _first_message(self, call: Call, turn: int) -> str:
        parts = [f"Request: {call.prompt}", describe_input(call.context)]
        named = [k for k in self.inputs if k != "context"]
        if named:
            shown = ", ".join(f"{k}={call.args.get(k)!r:.100}" for k in named)
            parts.append(f"`args` in the REPL holds the named arguments: {shown}")
        if turn > 1:
            parts.append(HISTORY_NOTE.format(turn=turn, n=turn - 1))
        return "\n\n".join(parts)

    def _reply(self, run: _Run, value: Value) -> Reply:
        return Reply(value=value, usage=self._usage(run))

    def _usage(self, run: _Run) -> Usage:
        return run.usage.model_copy(update={"wall_time": time.time() - run.started})


__all__ = ["RLMAgent"]
