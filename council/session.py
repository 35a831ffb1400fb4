"""Running a council: start what is needed, ask the entry peer, tear everything down.

    async with Session(council) as s:
        result = await s.ask("Review this draft", context=draft)
    print(result.value, result.usage.cost)

or, without async: `run(council, "Review this draft", context=draft)`.

By default every peer runs in this process, each on its own connection, against an
embedded nats-server that enforces the council's edges (one NATS user per peer,
generated from the declaration). With `nats_url` the session uses that server instead,
and `local=` picks the peers to run here (the rest run elsewhere, `council serve`).
Whatever happens (an answer, an exception, Ctrl-C) the exit stops the peers, closes
every connection, deletes the session's data and stops the embedded server.

`record=PATH` writes every message of the session to a cassette (council/record.py);
`replay=CASSETTE` answers the LLM peers, the agents' model peers and the humans from one
(council/replay.py) while agents, their REPL code and function peers run for real:

    async with Session(council, record="sessions/review.jsonl") as s: ...
    async with Session(council, replay="sessions/review.jsonl", strict=True) as s: ...

`resume=CASSETTE` carries on a run that was cut short (the runner killed, the machine
gone): asked the same again (`s.resumed` is the request the run was asked), every model
and human answer the cassette holds is handed out from it, the rest is asked live, and
the session records on into the same cassette.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.from_thread
from anyio.abc import TaskGroup, TaskStatus
from pydantic import BaseModel, ConfigDict

from channels import log, permissions, subjects
from channels.bus import DEFAULT_TIMEOUT, HEARTBEAT, Bus
from channels.errors import BadRequest, CouncilError
from channels.messages import Call, Reply, Usage, Value, new_id
from channels.server import embedded_server
from channels.store import Store
from council.cassette import Cassette
from council.declare import LLM, Agent, Council, Function, Human
from council.mcp import MCP, learn_tools, mcp_callees, servers_first
from council.record import Recorder, answered_by_models_or_humans
from council.replay import Replayer, ReplayMismatch
from council.telemetry import attach as attach_telemetry

if TYPE_CHECKING:
    from council.events import EventStream

_log = log.get("council.session")

RUNNER = permissions.ADMIN
INLINE_CONTEXT_LIMIT = 256 * 1024  # larger contexts go to the store first, the call carries a Ref


class PeerUnavailable(CouncilError, RuntimeError):
    """A kind of peer this installation cannot run (its module is missing or broken)."""


class Peer(Protocol):
    name: str

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = ...) -> None: ...


class Endpoint(Protocol):
    """A human endpoint (ScriptedHuman, TerminalHuman): runs on its own connection."""

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = ...) -> None: ...


class Result(BaseModel):
    """The entry peer's answer, and what the whole session spent to get it."""

    model_config = ConfigDict(frozen=True)

    value: Value
    usage: Usage
    session: str
    call_id: str

    @property
    def cost(self) -> float | None:
        return self.usage.cost

    @property
    def tokens(self) -> int:
        return self.usage.tokens


# -- building peers from the declaration ---------------------------------------------------


def _import(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerUnavailable(
            f"cannot run {what}: importing {module} failed ({e}); "
            "install the package with its dependencies (pip install -e .)"
        ) from e


Credentials = Callable[[str], tuple[str | None, str | None]]


def build(
    council: Council,
    name: str,
    *,
    models: Mapping[str, Any] | None = None,
    credentials: Credentials | None = None,
) -> list[Peer]:
    """The runtime objects that serve declared peer `name` (an agent brings its model peer).

    `credentials(name)` gives the NATS user for a connection the peer opens itself (an
    agent's REPL worker connects as `<agent>-repl`, with its agent's edges).
    """
    decl = council.peer(name)
    models = models or {}

    def model(spec: str) -> Any:
        """`models` may be keyed by the peer's name (or an agent's model peer) or by the
        model string."""
        for key in (decl.name, getattr(decl, "model_peer", None), spec):
            if key is not None and key in models:
                return models[key]
        return spec

    if isinstance(decl, MCP):
        return [decl.peer()]
    if isinstance(decl, Function):
        from agents.function import FunctionPeer

        return [FunctionPeer(decl.name, decl.callable(), decl.description)]
    if isinstance(decl, Human):
        from agents.human import HumanPeer

        return [HumanPeer(decl.name, description=decl.description)]
    if isinstance(decl, LLM):
        llm = _import("agents.llm", f"LLM peer {decl.name!r}")
        return [
            llm.LLMPeer(
                decl.name,
                model(council.model_of(decl)),
                description=decl.description,
                concurrency=decl.concurrency,
                output=decl.output,
                **decl.params,
            )
        ]
    if isinstance(decl, Agent):
        llm = _import("agents.llm", f"the model of agent {decl.name!r}")
        rlm = _import("agents.rlm", f"agent {decl.name!r}")
        # Every REPL worker of the agent (one per request in flight, child agents' and
        # conversations' too) takes one of the numbered names `<agent>-repl`, `-repl-2`, ...
        # and connects with that name's own login.
        # Refuse now, before anything runs, if the sandbox is "on" and this kernel cannot.
        _import("agents.repl.host", f"agent {decl.name!r}").sandbox_wanted(decl.sandbox)
        repl_options: dict[str, Any] = {"slots": decl.repl_slots, "sandbox": decl.sandbox}
        if credentials:  # one login per REPL name: a worker can act only as itself
            logins = {
                n: credentials(n) for n in permissions.family(decl.repl_peer, decl.repl_slots)
            }
            if any(user for user, _ in logins.values()):
                repl_options["logins"] = logins
        thinker = llm.LLMPeer(
            decl.model_peer,
            model(council.model_of(decl)),
            description=f"the model that {decl.name} thinks with",
        )
        agent = rlm.RLMAgent(
            decl.name,
            model=decl.model_peer,
            calls=council.specs(decl),
            limits=decl.limits,
            instructions=decl.instructions,
            description=decl.description,
            can_spawn=decl.can_spawn,
            concurrency=decl.concurrency,
            repl_options=repl_options,
            output=decl.output,
            inputs=decl.inputs,
            compaction=decl.compaction,
            window=lambda: thinker.model.context_window,
            warm=decl.warm,
        )
        return [agent, thinker]
    raise TypeError(f"unknown kind of peer: {decl!r}")


def replayed_names(council: Council, local: Iterable[str] | None = None) -> list[str]:
    """The names a replay answers from the cassette: LLM peers, each agent's model peer,
    humans (of the peers in `local`, by default all)."""
    names: list[str] = []
    for name in council.names() if local is None else local:
        decl = council.peer(name)
        if isinstance(decl, LLM | Human):
            names.append(decl.name)
        elif isinstance(decl, Agent):
            names.append(decl.model_peer)
    return names


# -- the session ---------------------------------------------------------------------------


class Session:
    """One run of a council. `ask` as often as you like between enter and exit."""

    def __init__(
        self,
        council: Council,
        *,
        nats_url: str | None = None,
        rights: bool | permissions.Rights = True,
        session: str | None = None,
        local: Iterable[str] | None = None,
        humans: Mapping[str, Endpoint] | None = None,
        models: Mapping[str, Any] | None = None,
        credentials: Mapping[str, tuple[str, str]] | tuple[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        keep_data: bool = False,
        record: str | Path | None = None,
        replay: str | Path | Cassette | Replayer | None = None,
        strict: bool = False,
        replay_live: bool = False,
        store_replicas: int | None = None,
        heartbeat: float = HEARTBEAT,
        telemetry: Any = None,
        resume: str | Path | None = None,
    ) -> None:
        """`record`: the cassette to write (its blobs go beside it). `replay`: a cassette (or
        a Replayer, to choose the peers or how requests match) whose recorded answers stand in
        for the LLM peers, the agents' model peers and the humans; no endpoint is opened for a
        replayed human. At exit the unused recordings are logged; with `strict` a request the
        cassette did not hold raises ReplayMismatch, and unused recordings UnusedRecordings.
        `replay_live`: a request the cassette does not hold is answered by the real peer
        instead (pytest's new_episodes); human endpoints are then opened as usual.
        `store_replicas`: copies of the session's store on a cluster (default: 3 on a
        cluster of 3 or more servers, else 1). `heartbeat`: seconds between a callee's signs
        of life on a call from this session's connections; a call silent for two of them is
        re-sent, then failed `unavailable`.
        `telemetry`: export OpenTelemetry spans (True, an OTLP/HTTP URL or a SpanExporter;
        by default when OTEL_EXPORTER_OTLP_ENDPOINT is set): council/telemetry.py.
        `resume`: a cassette of a run cut short to carry on (see the module docstring); it
        is the recording too, and the session id is the recorded one unless given."""
        self.resumed: Call | None = None
        if resume is not None:
            cassette, self.resumed = _resuming(resume, replay, record)
            session = session or cassette.header.session
            record = cassette.path
        self.council = council.check()
        self.nats_url = nats_url
        # True: generate users for the embedded server. A Rights: the users an external
        # server was configured with (`council rights`), used for every connection.
        given = rights if isinstance(rights, permissions.Rights) else None
        if given is not None and given.session != (session or given.session):
            raise CouncilError(
                f"the rights are for session {given.session!r}, not {session!r}; "
                "generate them for this session with `council rights`"
            )
        session = session or (given.session if given else None)
        self.use_rights = given is None and bool(rights) and nats_url is None
        self.session = subjects.check_name(session or "s" + new_id()[:12], "session")
        # MCP servers first: the agents that call them are told their tools (council/mcp.py)
        self.local = servers_first(council, council.names() if local is None else local)
        for name in self.local:
            council.peer(name)  # KeyError naming the known peers
        self.humans = dict(humans or {})
        for name in self.humans:
            if not isinstance(council.peer(name), Human):
                raise CouncilError(f"{name!r} is not a human peer of this council")
        self.models = dict(models or {})
        self._credentials = credentials
        self.timeout = timeout
        self.keep_data = keep_data
        self.store_replicas = store_replicas
        self.heartbeat = heartbeat
        self.store: Store | None = None  # the runner's (admin) view of the session's store
        self.record_path = Path(record) if record is not None else None
        self.recorder: Recorder | None = None
        self.record_options: dict[str, Any] = {}  # more Recorder options (e.g. blobs=...)
        self.strict = strict
        self.replay_live = replay_live
        self.telemetry = telemetry
        self.replayer = self._replayer(replay) if replay is not None else None
        if resume is not None:
            self.replay_live, self.strict = True, False
            names = replayed_names(self.council, self.local)
            self.replayer = Replayer(cassette, names, resume=True)
            self.record_options["resume"] = cassette
        self.replayed: set[str] = set(self.replayer.names) if self.replayer else set()
        for name in list(self.humans):
            if name in self.replayed and not self.replay_live:  # the cassette answers for them
                del self.humans[name]
        self.rights: permissions.Rights | None = given
        self.url: str | None = nats_url
        self.server_pid: int | None = None
        self.client: Bus | None = None
        self.peers: dict[str, Peer] = {}
        self._stack: AsyncExitStack | None = None
        self._human_creds: dict[str, Path] = {}  # human -> its endpoint's credential file
        self._tg: TaskGroup | None = None
        self._buses: list[Bus] = []

    def _replayer(self, replay: str | Path | Cassette | Replayer) -> Replayer:
        if isinstance(replay, Replayer):
            return replay
        names = replayed_names(self.council, self.local)
        return Replayer(replay, names, strict=self.strict)  # refuses a bad cassette now

    def _model_names(self) -> dict[str, str]:
        """For the cassette's header: the model behind each peer a replay would answer."""
        _, models = answered_by_models_or_humans(self.council)
        for peer, spec in models.items():
            given = self.models.get(peer, self.models.get(spec))
            if given is not None:
                models[peer] = given if isinstance(given, str) else getattr(given, "name", spec)
        return models

    # -- credentials ----------------------------------------------------------------------

    def credentials(self, name: str) -> tuple[str | None, str | None]:
        """(user, password) for the connection acting as `name`."""
        if self.rights is not None:
            try:
                return self.rights.credentials(name)
            except KeyError:
                return self.rights.credentials(RUNNER)  # names outside the topology: runner
        given = self._credentials
        if isinstance(given, tuple):
            return given
        if given and name in given:
            return given[name]
        return None, None

    async def connect(self, name: str) -> Bus:
        """A new connection in this session acting as `name` (closed when the session ends)."""
        assert self.url and self._stack, "enter the session first"
        user, password = self.credentials(name)
        bus = await Bus.connect(
            self.url,
            session=self.session,
            name=name,
            user=user,
            password=password,
            default_timeout=self.timeout,
            heartbeat=self.heartbeat,
        )
        self._buses.append(bus)
        return bus

    async def _close_buses(self) -> None:
        buses, self._buses = self._buses, []
        with anyio.CancelScope(shield=True):
            for bus in reversed(buses):
                await bus.close()

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        stack = AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        try:
            await self._start(stack)
        except BaseException as e:
            await _unwind(stack, type(e), e, e.__traceback__)
            raise
        return self

    async def _start(self, stack: AsyncExitStack) -> None:
        if self.nats_url is None:
            config = ""
            if self.use_rights:
                self.rights = permissions.rights(
                    self.session,
                    self.council.edges(),
                    serves=self.council.serves(),
                    slots=self.council.slots(),
                    humans=self.council.desks(),
                )
                config = self.rights.authorization()
            server = await stack.enter_async_context(embedded_server(config_extra=config))
            self.url, self.server_pid = server.url, server.pid
        # Exit runs these in reverse: stop the peers, close their connections, drop the
        # session's data (on the runner's connection), close it, stop the server.
        stack.push_async_callback(self._close_buses)
        self.client = await self.connect(RUNNER)
        stack.push_async_callback(self._drop_data)
        await self._provision()
        if self.record_path is not None:
            # Listening before any peer starts; stopped once they all have, while the store
            # still holds the values its Refs name.
            recording = await self.connect("recorder")
            self.recorder = Recorder(
                recording.nc,
                self.session,
                self.record_path,
                council=self.council,
                models=self._model_names(),
                meta={"entry": self.council.entry, "local": self.local},
                **self.record_options,
            )
            await self.recorder.start()
            stack.push_async_callback(self._stop_recording)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)  # runs first on exit: stop every peer
        self._tg = tg
        await attach_telemetry(self)  # off unless configured
        for name in self.local:
            if not isinstance(self.council.peer(name), MCP):
                await learn_tools(self.council, self.client)  # once: only tools not yet learnt
            if name in self.replayed:
                continue  # an LLM peer or a human: the cassette answers
            for peer in build(self.council, name, models=self.models, credentials=self.credentials):
                if peer.name in self.replayed:
                    continue  # an agent's model peer
                bus = await self.connect(peer.name)
                await tg.start(peer.run, bus)
                self.peers[peer.name] = peer
        if self.replayer is not None:
            if self.replay_live:
                self.replayer.forward = await self._live_forward()
            for peer in self.replayer.peers():
                await tg.start(peer.run, await self.connect(peer.name))
                self.peers[peer.name] = peer
        for human, endpoint in self.humans.items():
            decl = self.council.peer(human)
            assert isinstance(decl, Human)
            await tg.start(endpoint.run, await self.connect(decl.desk))
        _log.info("session.started", session=self.session, url=self.url, local=self.local)

    async def _live_forward(self) -> Callable[[Call], Awaitable[Reply]]:
        """The real peers behind the replayed names, called directly (not served: the
        cassette's peers hold their subjects) for the requests the cassette lacks."""
        from agents.human import HumanPeer

        handlers: dict[str, Callable[[Call], Awaitable[Any]]] = {}
        for name in self.local:
            for peer in build(self.council, name, models=self.models, credentials=self.credentials):
                if peer.name not in self.replayed:
                    continue
                bus = await self.connect(peer.name)
                if isinstance(peer, HumanPeer):
                    peer.attach(bus)  # what its run() does before serving
                    handlers[peer.name] = peer.ask
                else:
                    # What its run() does before serving: import the model's library off the
                    # event loop now, not in the first forwarded call (seconds of a loop that
                    # must keep answering and heartbeating the calls it holds).
                    prepare = getattr(getattr(peer, "model", None), "prepare", None)
                    if prepare is not None:
                        await prepare()
                    handlers[peer.name] = partial(peer.handle, bus)  # type: ignore[attr-defined]

        async def forward(call: Call) -> Reply:
            handler = handlers.get(call.callee)
            if handler is None:
                raise BadRequest(
                    f"{call.callee!r} is replayed from the cassette and not run here, so a new "
                    "request to it cannot be answered live; run the session with it local",
                    call_id=call.id,
                    callee=call.callee,
                )
            out = await handler(call)
            return out if isinstance(out, Reply) else Reply(value=out)

        return forward

    async def __aexit__(self, *exc: Any) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        out = await _unwind(stack, *exc)
        _log.info("session.ended", session=self.session)
        self._end_replay(exc[1] if len(exc) > 1 else None)
        return out

    async def _stop_recording(self) -> None:
        if self.recorder is None:
            return
        with anyio.CancelScope(shield=True):
            summary = await self.recorder.stop()
        _log.info("session.recorded", path=str(summary.path), entries=summary.entries)

    def _end_replay(self, error: BaseException | None) -> None:
        """Say what the replay left unused; with `strict`, fail on anything unfaithful.

        A mismatch replaces the error it caused (a peer's bad_request surfacing through the
        agents) with the request that first differed; an unrelated error stays as it is.
        """
        replayer = self.replayer
        if replayer is None:
            return
        faithful = not replayer.mismatches and not replayer.unused()
        if self.resumed is not None:
            _log.info("session.resumed", report=replayer.report())
            return
        (_log.info if faithful else _log.warning)("session.replayed", report=replayer.report())
        if not self.strict or (error is not None and not isinstance(error, CouncilError)):
            return
        if replayer.mismatches:
            try:
                replayer.check(strict=False)
            except ReplayMismatch as mismatch:
                raise mismatch from error
        if error is None:
            replayer.check(strict=True)

    async def _provision(self) -> None:
        """The runner creates the session's data before any peer runs: peers may not."""
        self.store = await Store.provision(
            self.client.nc,  # type: ignore[union-attr]
            scope=self.session,
            replicas=self.store_replicas,
        )
        if humans := self.council.desks():
            from agents.human import provision

            await provision(self.client, humans)  # type: ignore[arg-type]

    async def _drop_data(self) -> None:
        """Session data is not kept unless asked: the human bucket and the store scope."""
        if self.keep_data or self.client is None or self.client.nc.is_closed:
            return
        from agents.human import delete_buckets

        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(5):
                await delete_buckets(self.client, self.council.desks())
                if self.store is not None:
                    await self.store.drop()
        except Exception as e:  # best effort: an embedded server's data goes with it anyway
            _log.warning("session.data_not_dropped", session=self.session, error=str(e))

    # -- asking ---------------------------------------------------------------------------

    async def ask(
        self,
        prompt: str,
        *,
        context: Value | bytes = None,
        args: dict[str, Any] | None = None,
        timeout: float | None = None,
        entry: str | None = None,
        notify: str | None = None,
    ) -> Result:
        """Call the entry peer (or `entry`) and return its answer with the session's usage.

        `notify` names a human who gets the final answer at their endpoint.
        """
        client = self.client
        if client is None:
            raise CouncilError("the session is not running; use `async with Session(...)`")
        context = await self._place(context)
        call = client.make_call(
            entry or self.council.entry, prompt, context=context, args=args, timeout=timeout
        )
        reply = await client.send(call)
        result = Result(value=reply.value, usage=reply.usage, session=self.session, call_id=call.id)
        if notify:
            from agents.human import Final, send_final

            await send_final(client, notify, Final(id=call.id, prompt=prompt, value=reply.value))
        return result

    async def _place(self, context: Value | bytes) -> Value:
        """Big inputs travel by reference: put them in the store, pass the Ref."""
        big = isinstance(context, bytes | str) and len(context) > INLINE_CONTEXT_LIMIT
        if not (big or isinstance(context, bytes)):
            return context
        store = await _store(self.client)  # type: ignore[arg-type]
        if store is None:
            if isinstance(context, bytes):
                raise CouncilError("bytes context needs the shared store (channels/store.py)")
            return context
        return await store.put(context)

    def human_command(self, human: str) -> str:
        """The shell command that attaches a person as `human`, from any terminal here.

        With rights on, it names a credential file holding that human's endpoint user only
        (mode 0600, in a private directory removed when the session ends): never a password.
        """
        assert self.url and self._stack, "enter the session first"
        decl = self.council.peer(human)
        if not isinstance(decl, Human):
            raise CouncilError(f"{human!r} is not a human peer of this council")
        command = f"council human --name {human} --nats {self.url} --session {self.session}"
        if self.rights is not None and self.rights.holds(decl.desk):
            if human not in self._human_creds:
                where = Path(tempfile.mkdtemp(prefix="council-rights-"))
                self._stack.callback(shutil.rmtree, where, True)
                self.rights.write(where, only=[decl.desk])
                self._human_creds[human] = where / permissions.cred_file_name(decl.desk)
            command += f" --rights {self._human_creds[human]}"
        return command

    def events(self, **options: Any) -> EventStream:
        """The session's typed events as they happen, for apps (council/events.py)."""
        from council.events import EventStream

        return EventStream(self, **options)

    def call_in(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Run `fn` alongside the peers until the session ends (progress displays, etc.)."""
        assert self._tg is not None, "enter the session first"
        self._tg.start_soon(fn)

    async def start(self, fn: Callable[..., Awaitable[Any]]) -> Any:
        """Like `call_in`, returning once `fn` calls `task_status.started()`."""
        assert self._tg is not None, "enter the session first"
        return await self._tg.start(fn)


def _resuming(
    path: str | Path, replay: object, record: str | Path | None
) -> tuple[Cassette, Call | None]:
    """The cassette a resume carries on, and the request its run was asked."""
    if replay is not None:
        raise CouncilError("resume= carries on a recording; it cannot be combined with replay=")
    cassette = Cassette.load(path, lenient=True)
    if record is not None and Path(record).resolve() != cassette.path.resolve():
        raise CouncilError(f"a resumed run records on into {cassette.path}; drop record={record}")
    return cassette, resumed_request(cassette)


def resumed_request(cassette: Cassette) -> Call | None:
    """The request the recorded run was asked (its first call from the runner), if any."""
    return next(
        (
            it.call
            for it in cassette.interactions()
            if it.call.caller == RUNNER and it.call.parent is None
        ),
        None,
    )


async def _unwind(stack: AsyncExitStack, *exc: Any) -> bool | None:
    """Run the exit steps (each shields itself from cancellation).

    An ordinary error propagates as itself, not wrapped in the peers' task group's
    ExceptionGroup; cancellation and Ctrl-C go through the steps so anyio sees them.
    """
    exc_type = exc[0] if exc else None
    if exc_type is not None and issubclass(exc_type, Exception):
        await stack.__aexit__(None, None, None)
        return False
    return await stack.__aexit__(*exc)


async def _store(bus: Bus) -> Any:
    store = getattr(bus, "store", None)
    if store is None:
        return None
    return await store() if callable(store) else store


# -- serving one peer elsewhere -------------------------------------------------------------


async def serve(
    council: Council,
    peer: str,
    *,
    nats_url: str,
    session: str,
    credentials: tuple[str | None, str | None] = (None, None),
    rights: permissions.Rights | None = None,
    models: Mapping[str, Any] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve declared peer `peer` (and what it brings) on `nats_url` until cancelled.

    With `rights` (from `council rights`), each connection uses its own user: the peer's,
    its model peer's, its REPL worker's. Otherwise every one uses `credentials`.
    """
    council.check()
    council.peer(peer)

    def creds(name: str) -> tuple[str | None, str | None]:
        return rights.credentials(name) if rights is not None else credentials

    if callees := mcp_callees(council, peer):  # an agent is told their tools (council/mcp.py)
        user, password = creds(peer)
        async with await Bus.connect(
            nats_url, session=session, name=peer, user=user, password=password
        ) as bus:
            await learn_tools(council, bus, only=callees)
    buses: list[Bus] = []
    try:
        async with anyio.create_task_group() as tg:
            for obj in build(council, peer, models=models, credentials=creds):
                user, password = creds(obj.name)
                bus = await Bus.connect(
                    nats_url, session=session, name=obj.name, user=user, password=password
                )
                buses.append(bus)
                await tg.start(obj.run, bus)
            _log.info("serve.ready", peer=peer, session=session, url=nats_url)
            task_status.started()
    finally:
        with anyio.CancelScope(shield=True):
            for bus in buses:
                await bus.close()


async def until_signalled() -> None:
    """Return on SIGTERM or SIGINT, so a served peer shuts down in order."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


# -- the sync convenience ----------------------------------------------------------------------


def run(
    council: Council,
    prompt: str,
    *,
    context: Value | bytes = None,
    args: dict[str, Any] | None = None,
    timeout: float | None = None,
    **session_options: Any,
) -> Result:
    """Start the council, ask once, tear down; for scripts and notebooks without async.

    Where an event loop already runs in this thread (a Jupyter cell runs inside the
    kernel's), the session runs on a loop of its own in a worker thread, and this waits
    for it; interrupting the wait (the kernel's stop button) cancels the session.
    """

    async def main() -> Result:
        async with Session(council, **session_options) as s:
            return await s.ask(prompt, context=context, args=args, timeout=timeout)

    if not _loop_running():
        return anyio.run(main)
    with anyio.from_thread.start_blocking_portal(name="council-run") as portal:
        return portal.call(main)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def children(pid: int | None = None) -> set[int]:
    """Live child processes of `pid` (default: this process), for teardown checks."""
    pid = pid or os.getpid()
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out
