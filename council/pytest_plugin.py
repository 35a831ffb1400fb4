"""pytest plugin: a cassette per test, replayed by default, re-recorded on request.

A whole council (agents and their REPL code run for real; models and humans replayed):

    async def test_review(council_cassette):
        async with council_cassette.session(council, models=..., humans=...) as s:
            result = await s.ask("Review this draft", context=draft)
        assert result.value == ...

Plain bus peers:

    async def test_review(council_cassette):
        async with council_cassette.run({"llm": my_llm_peer}) as bus:
            reply = await bus.call("llm", "review this")

Record modes (`--council-record=MODE`, or the `council_record` ini option; default none):

- none:          replay only; a missing cassette or an unrecorded request fails the test
- once:          record when the cassette does not exist yet, else replay as `none`
- new_episodes:  replay what the cassette holds, answer new requests live, and save both
- all:           record everything live, replacing the cassette

Cassettes live beside the test: `<test folder>/cassettes/<module>/<test name>.jsonl`
(`@pytest.mark.council_cassette("name.jsonl", replay=[...], strict=True, normalize=fn)`
changes the name, the replayed peers, strictness, or how requests are matched). In replay the peers named in `run(...)` are
never started, so a replayed test needs no network and no API key.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from channels.bus import Bus
from channels.messages import Call, Reply
from council import cassette as cassette_mod
from council.cassette import Cassette, CassetteError, blobs_dir_name
from council.record import Recorder
from council.replay import Replayer, ReplayPeer

if TYPE_CHECKING:
    from council.declare import Council
    from council.session import Session

MODES = ("none", "once", "new_episodes", "all")

Live = Callable[[Call], Awaitable[Any]] | Any  # a bus handler, or a peer object with run(bus)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("council", "council recording and replay")
    group.addoption(
        "--council-record",
        dest="council_record",
        choices=MODES,
        default=None,
        help="record mode for council cassettes: none (replay only, the default), once, "
        "new_episodes, all",
    )
    parser.addini("council_record", "default council record mode", default="none")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "council_cassette(path=None, *, replay=None, strict=False, normalize=None): the "
        "cassette of this test (path relative to the test's folder), the peers answered from "
        "it, whether recorded calls the test never makes fail it, and a function rewriting "
        "requests before matching",
    )


def record_mode(config: pytest.Config) -> str:
    mode = config.getoption("council_record") or config.getini("council_record") or "none"
    if mode not in MODES:
        raise pytest.UsageError(f"council_record = {mode!r}; use one of {', '.join(MODES)}")
    return mode


class CouncilCassette:
    """One test's cassette: whether this run records or replays, and the parts to do either.

    `run(...)` does the whole thing for plain bus peers. A session runner binds it by
    asking `.recording`; then either starting its live peers plus `recorder(nc, session)`,
    or serving `peers_to_replay(names)` in place of those peers. `finish()` (also run at
    teardown) stops the recorder and fails the test on a replay mismatch; the fixture puts
    the recording in place (`save()`) only if the test passed. new_episodes forwards
    unrecorded requests to the live peers on a shadow session, so it suits leaf peers
    (models, humans), not peers that call others.
    """

    def __init__(
        self,
        path: Path,
        mode: str,
        url: str,
        *,
        replay: list[str] | None = None,
        strict: bool = False,
        normalize: Any = None,
    ):
        self.path = path
        self.normalize = normalize
        self.mode = mode
        self.url = url
        self.replay_names = replay
        self.strict = strict
        self.session_id = "t" + uuid.uuid4().hex[:10]
        exists = path.is_file()
        self.recording = mode == "all" or (mode in ("once", "new_episodes") and not exists)
        self.extending = mode == "new_episodes" and exists  # replay + live for new requests
        self.replayer: Replayer | None = None
        self._recorder: Recorder | None = None
        self._buses: list[Bus] = []
        self._finished = False

    @property
    def replaying(self) -> bool:
        return not self.recording

    @property
    def _recording_path(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".jsonl") + ".recording.jsonl")

    # -- the parts ----------------------------------------------------------------------

    def peers_to_replay(
        self, names: list[str] | None = None, *, forward: Any = None
    ) -> list[ReplayPeer]:
        """Peers answering from the cassette (names: given, else the marker's, else the
        cassette's own list). Refuses a missing cassette with the command that records it."""
        if not self.path.is_file():
            raise CassetteError(
                f"no cassette at {self.path} and --council-record={self.mode} does not record; "
                "record it with: pytest --council-record=once "
                f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}".rstrip()
            )
        names = names or self.replay_names
        self.replayer = Replayer(
            self.path, names, strict=self.strict, forward=forward, normalize=self.normalize
        )
        return self.replayer.peers()

    def recorder(self, nc: Any, session: str | None = None, **header: Any) -> Recorder:
        """A recorder writing this test's cassette (in place only once the test passes)."""
        self._recorder = Recorder(
            nc,
            session or self.session_id,
            self._recording_path,
            blobs=blobs_dir_name(self.path),
            **header,
        )
        return self._recorder

    async def connect(self, name: str) -> Bus:
        """A bus in this test's session, closed when the test ends."""
        bus = await Bus.connect(self.url, session=self.session_id, name=name)
        self._buses.append(bus)
        return bus

    # -- a whole council ------------------------------------------------------------------

    @asynccontextmanager
    async def session(self, council: Council, **session_kwargs: Any) -> AsyncIterator[Session]:
        """A Session of `council` (its own embedded server, rights on) that records this
        test's cassette (modes all, and once/new_episodes without a cassette yet) or replays
        it: the LLM peers, the agents' model peers and the humans answer from the cassette
        (or the marker's `replay=` names), so `models=` and `humans=` are only used live.
        new_episodes with an existing cassette replays what it holds, answers new requests
        with the real models and humans, and saves both."""
        from council.session import Session, replayed_names

        kwargs: dict[str, Any] = {"session": self.session_id, **session_kwargs}
        if self.recording:
            s = Session(council, record=self._recording_path, **kwargs)
        else:
            if not self.path.is_file():
                self.peers_to_replay()  # raises: no cassette, and how to record it
            names = self.replay_names or replayed_names(council, kwargs.get("local"))
            self.replayer = Replayer(self.path, names, strict=self.strict, normalize=self.normalize)
            s = Session(
                council,
                replay=self.replayer,
                strict=self.strict and not self.extending,
                record=self._recording_path if self.extending else None,
                replay_live=self.extending,
                **kwargs,
            )
        s.record_options["blobs"] = blobs_dir_name(self.path)
        try:
            async with s:
                yield s
        finally:
            self._recorder = s.recorder
        await self.finish()  # the test sees a mismatch where its session ended

    # -- all in one, for plain bus peers ------------------------------------------------

    @asynccontextmanager
    async def run(self, live: dict[str, Live], *, name: str = "test") -> AsyncIterator[Bus]:
        """Serve `live` (name -> handler or peer) when recording, or answer those names from
        the cassette when replaying; yield a bus called `name` to make calls with."""
        names = list(live)
        try:
            async with anyio.create_task_group() as tg:
                try:
                    if self.recording or self.extending:
                        rec_bus = await self.connect("recorder")
                        await self.recorder(rec_bus.nc, replay=names).start()
                    if self.recording:
                        await self._serve(tg, live, self.session_id)
                    else:
                        forward = None
                        if self.extending:
                            forward = await self._live_forward(tg, live)
                        for peer in self.peers_to_replay(names, forward=forward):
                            await tg.start(peer.run, await self.connect(peer.name))
                    yield await self.connect(name)
                    await self.finish()  # the test sees a mismatch where it made the call
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _serve(self, tg: Any, live: dict[str, Live], session: str) -> None:
        for peer_name, peer in live.items():
            bus = await Bus.connect(self.url, session=session, name=peer_name)
            self._buses.append(bus)
            if hasattr(peer, "run"):
                await tg.start(peer.run, bus)
            else:
                await tg.start(bus.serve, peer_name, peer)

    async def _live_forward(
        self, tg: Any, live: dict[str, Live]
    ) -> Callable[[Call], Awaitable[Reply]]:
        """new_episodes: the real peers serve a shadow session; requests the cassette lacks
        go there, and their answers reach the caller (and so the new recording)."""
        shadow = self.session_id + "-live"
        await self._serve(tg, live, shadow)
        out = await Bus.connect(self.url, session=shadow, name="replay-forward")
        self._buses.append(out)

        async def forward(call: Call) -> Reply:
            return await out.send(call.model_copy(update={"session": shadow}))

        return forward

    # -- the end ------------------------------------------------------------------------

    async def finish(self) -> None:
        """Stop recording and fail on replay mismatches (strict: on unused recordings too);
        idempotent. The recording replaces the cassette only once the test has passed."""
        if self._finished:
            return
        self._finished = True
        if self._recorder is not None:
            await self._recorder.stop()
        if self.replayer is not None:
            self.replayer.check()

    def save(self) -> Path | None:
        """Put this run's recording in place (merged with the old cassette for new_episodes)."""
        if self._recorder is None or not self._recording_path.exists():
            return None
        if self.extending and self.replayer is not None:
            self._merge()
        else:
            self._recording_path.replace(self.path)
        return self.path

    def _merge(self) -> None:
        """This run's recording, then the old cassette's interactions it did not use."""
        assert self.replayer is not None
        new = Cassette.load(self._recording_path)
        old = self.replayer.cassette
        keep = {it.call.id for it in self.replayer.unused()}
        kept = [e for e, m in old.messages() if getattr(m, "id", None) in keep]
        cassette_mod.write(self.path, new.header, [*new.entries, *kept])
        self._recording_path.unlink()

    async def aclose(self) -> None:
        for bus in self._buses:
            await bus.close()
        self._buses.clear()


def default_path(request: pytest.FixtureRequest) -> Path:
    test_file = Path(request.node.path)
    name = request.node.name
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "[" in name:
        # One cassette whatever the anyio backend: drop its id, keep the test's own params.
        backend = callspec.params.get("anyio_backend")
        ids = name[name.index("[") + 1 : -1].split("-")
        if backend in ids:
            ids.remove(backend)
        name = request.node.originalname + (f"[{'-'.join(ids)}]" if ids else "")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    return test_file.parent / "cassettes" / test_file.stem / f"{name}.jsonl"


@pytest.fixture(scope="session")
def council_nats_url() -> Iterator[str]:
    """$NATS_URL if set, else an embedded nats-server for the run (loopback only)."""
    url = os.environ.get("NATS_URL")
    if url:
        yield url
        return
    from channels.server import running_server

    with running_server() as server:
        yield server.url


_passed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_passed] = report.passed
    return report


@pytest.fixture
async def council_cassette(
    request: pytest.FixtureRequest, council_nats_url: str
) -> AsyncIterator[CouncilCassette]:
    marker = request.node.get_closest_marker("council_cassette")
    path = default_path(request)
    replay = None
    strict = False
    normalize = None
    if marker is not None:
        if marker.args:
            path = Path(request.node.path).parent / marker.args[0]
        replay = marker.kwargs.get("replay")
        strict = bool(marker.kwargs.get("strict", False))
        normalize = marker.kwargs.get("normalize")
    cassette = CouncilCassette(
        path,
        record_mode(request.config),
        council_nats_url,
        replay=replay,
        strict=strict,
        normalize=normalize,
    )
    try:
        yield cassette
        passed = request.node.stash.get(_passed, False)
        try:
            await cassette.finish()
        except CassetteError as e:
            if passed:  # a mismatch the test's code swallowed still fails it
                raise
            # the test failed already: say why the replay went wrong without a second error
            print(f"council replay: {e}", file=sys.stderr)
        if passed:
            await anyio.to_thread.run_sync(cassette.save)
    finally:
        await cassette.aclose()
        if cassette._recording_path.exists():  # a failed test never replaces a cassette
            cassette._recording_path.unlink()
