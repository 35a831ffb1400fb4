"""Rights from the topology, enforced by a real nats-server: allowed calls work, the rest are
refused by the server, even for raw nats-py on a peer's credentials."""

from __future__ import annotations

import time

import anyio
import nats
import nats.errors
import pytest

from agents.function import Peers
from channels import permissions, subjects
from channels.bus import Bus
from channels.errors import CouncilError, PermissionDenied, Unavailable
from channels.natsio import settle
from channels.server import embedded_server
from channels.store import peer_subjects
from council.declare import Agent, Council, Function, Human
from council.session import Session, children

pytestmark = pytest.mark.anyio


def echo(text: str) -> str:
    return f"echo: {text}"


def secret(text: str) -> str:
    return "the vault is open"


async def relay(target: str, peers: Peers) -> str:
    """Calls whichever peer the prompt names: the server decides whether it may."""
    return await peers(target, "hello")


COUNCIL = Council(
    entry="relay",
    peers=[
        Function(relay, calls=["echo"]),
        Function(echo),
        Function(secret),
        Human("ada"),
    ],
)


async def test_allowed_call_works_and_a_call_outside_the_edges_is_denied_at_once():
    async with Session(COUNCIL) as s:
        assert s.rights is not None
        ok = await s.ask("echo")
        assert ok.value == "echo: hello"
        started = time.monotonic()
        with pytest.raises(PermissionDenied) as info:
            await s.ask("secret", timeout=30)
        assert time.monotonic() - started < 5  # refused by the server, not a timeout
        assert "'relay' may not call 'secret'" in str(info.value)
        assert "add 'secret' to 'relay''s calls" in str(info.value)
        # The runner may call anyone; the refusal was about relay's edges only.
        assert (await s.client.call("secret", "x", timeout=10)).value == "the vault is open"


async def test_raw_nats_on_a_peers_credentials_is_refused_by_the_server():
    async with Session(COUNCIL) as s:
        user, password = s.credentials("relay")
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        nc = await nats.connect(
            s.url,
            user=user,
            password=password,
            error_cb=on_error,
            inbox_prefix=subjects.inbox_prefix(s.session, "relay"),
        )
        try:
            # Its own edge is open (echo answers, here with bad_request to a non-call).
            msg = await nc.request(subjects.call(s.session, "echo", "relay"), b"{}", timeout=5)
            assert b"bad_request" in msg.data
            # Outside its edges the message never reaches the peer.
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(subjects.call(s.session, "secret", "relay"), b"{}", timeout=0.5)
            assert any(
                f'publish to "{subjects.call(s.session, "secret", "relay")}"'.lower() in e
                for e in errors
            ), errors
            # Nor may it listen in on another peer's calls or another connection's replies.
            await nc.subscribe(subjects.call(s.session, "secret", subjects.ANY))
            await nc.subscribe(f"{subjects.inbox_prefix(s.session, 'echo')}.>")
            await nc.publish(subjects.event(s.session, "secret", "log"), b"{}")
            await settle(nc)
            with anyio.fail_after(5):
                while len(errors) < 4:
                    await anyio.sleep(0.02)
            text = "\n".join(errors).lower()  # nats-py lowercases the server's errors
            for refused in (
                f'subscription to "{subjects.call(s.session, "secret", subjects.ANY)}"',
                f'subscription to "{subjects.inbox_prefix(s.session, "echo")}.>"',
                f'publish to "{subjects.event(s.session, "secret", "log")}"',
            ):
                assert refused.lower() in text
        finally:
            await nc.close()

        # The same credentials through a Bus: PermissionDenied, both the first time and after
        # an allowed subject has taken the fast path.
        async with await Bus.connect(
            s.url, session=s.session, name="relay", user=user, password=password
        ) as bus:
            assert (await bus.call("echo", "a", timeout=5)).value == "echo: a"
            assert (await bus.call("echo", "b", timeout=5)).value == "echo: b"
            for _ in range(2):
                with pytest.raises(PermissionDenied):
                    await bus.call("secret", "x", timeout=30)
            with pytest.raises(PermissionDenied):
                await bus.call("ada", "x", timeout=30)


async def test_wrong_or_missing_credentials_cannot_connect():
    async with Session(COUNCIL) as s:
        with pytest.raises(Unavailable, match="cannot connect"):
            await Bus.connect(s.url, session=s.session, name="relay", connect_timeout=0.5)
        with pytest.raises(Unavailable, match="cannot connect"):
            await Bus.connect(
                s.url,
                session=s.session,
                name="relay",
                user="relay",
                password="guess",
                connect_timeout=0.5,
            )


async def test_agent_rights_cover_its_repl_worker_and_model():
    council = Council(
        entry="chair",
        peers=[
            Agent("chair", model="m", calls=["critic"], can_spawn=True),
            Agent("critic", model="m"),
            Human("ada"),
        ],
    )
    session = "p" + str(int(time.time()))
    r = permissions.rights(session, council.edges(), serves=council.serves())
    chair, repl = r.for_peer("chair"), r.for_peer("chair-repl")
    assert set(repl.publish) >= {
        subjects.call(session, "critic", "chair-repl"),
        subjects.call(session, "chair-child", "chair-repl"),
    }
    assert not [x for x in repl.publish if ".call.ada." in x]
    assert subjects.call(session, "chair-model", "chair") in chair.publish
    assert subjects.call(session, "chair-child", subjects.ANY) in chair.subscribe
    model = r.for_peer("chair-model").publish
    assert not [x for x in model if ".call." in x or ".cancel." in x]  # it calls no one
    # Its store rights are the session's data plane, and no JetStream API beyond direct gets.
    assert set(peer_subjects(session)[0]) <= set(model)
    api = [x for x in model if x.startswith("$JS.")]
    assert api and all(x.startswith("$JS.API.DIRECT.GET.") for x in api), api
    # It answers only who may call it: its agent (and the agent's REPL workers), the runner.
    inboxes = {x for x in model if x.startswith("_INBOX.")}
    callers = ("admin", "chair", "chair-child", "chair-repl")
    assert inboxes == {f"{subjects.inbox_prefix(session, n)}.>" for n in callers}
    # A real server accepts the generated block and enforces it for the worker's user.
    _, admin_password = r.credentials(permissions.ADMIN)
    async with embedded_server(config_extra=r.authorization()) as server:
        admin = await Bus.connect(
            server.url, session=session, name="admin", user=r.admin.user, password=admin_password
        )
        user, password = r.credentials("chair-repl")
        worker = await Bus.connect(
            server.url, session=session, name="chair-repl", user=user, password=password
        )
        try:
            async with anyio.create_task_group() as tg:

                async def critique(call):
                    return "fine"

                await tg.start(admin.serve, "critic", critique)
                assert (await worker.call("critic", "draft", timeout=5)).value == "fine"
                with pytest.raises(PermissionDenied):
                    await worker.call("ada", "help?", timeout=30)
                tg.cancel_scope.cancel()
        finally:
            await worker.close()
            await admin.close()


FORGING_CODE = """```python
n = word_count(context)
# Forge a function for a peer this agent may not call, on the worker's own connection.
forged = type(word_count)(
    word_count._worker,
    word_count.info.model_copy(update={"name": "secret", "target": "secret"}),
    "secret",
)
try:
    forged("open up")
    typed = "not refused"
except Exception as e:
    typed = type(e).__name__
# And raw nats-py on the same connection (the worker's NATS user).
w = word_count._worker
try:
    w.bridge.submit(w.bus.nc.request(f"council.{w.bus.session}.call.secret.{w.bus.name}", b"{}", timeout=1)).result()
    raw = "answered"
except Exception as e:
    raw = type(e).__name__
FINAL({"n": n, "typed": typed, "raw": raw})
```"""


async def test_an_agents_repl_code_is_held_to_the_agents_edges():
    from agents.models import ScriptedModel

    council = Council(
        entry="chair",
        peers=[
            Agent("chair", model="scripted", calls=["word_count"]),
            Function(word_count),
            Function(secret),
        ],
    )
    before = children()
    async with Session(council, models={"scripted": ScriptedModel([FORGING_CODE])}) as s:
        result = await s.ask("count", context="one two three", timeout=60)
    assert result.value == {"n": 3, "typed": "PermissionDenied", "raw": "TimeoutError"}
    assert children() == before  # no REPL worker or server left behind


def word_count(text: str) -> int:
    return len(text.split())


def blob(n: int) -> str:
    return "x" * n


def size(text: str) -> int:
    return len(text)


async def test_the_store_works_under_rights_both_ways():
    """Peers write (a spilled big answer) and read (a Ref context) the store on their users."""
    council = Council(entry="size", peers=[Function(size), Function(blob)])
    async with Session(council) as s:
        assert s.rights is not None
        big = await s.ask("2000000", entry="blob", timeout=60)  # bigger than max_payload
        assert isinstance(big.value, str) and len(big.value) == 2_000_000
        measured = await s.ask("", context="y" * 600_000, timeout=60)  # travels as a Ref
        assert measured.value == 600_000


def test_rights_files_hold_each_secret_once_and_only_for_its_owner(tmp_path):
    """`Rights.write` gives the server its part (hashes only) and each user a private file;
    loading takes only what a machine was given and refuses a file of another run."""
    council = Council(entry="relay", peers=[Function(relay, calls=["echo"]), Function(echo)])
    r = permissions.rights("w1", council.edges(), serves=council.serves())
    out = tmp_path / "rights"
    written = r.write(out)
    assert out.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in written} == {0o600}
    public = (out / "nats.conf").read_text() + (out / "rights.json").read_text()
    for peer in ("admin", "relay", "echo"):
        secret = r.credentials(peer)[1]
        assert secret not in public
        holders = [p.name for p in out.iterdir() if secret in p.read_text()]
        assert holders == [permissions.cred_file_name(peer)]
    assert permissions.Rights.load(out).credentials("relay") == r.credentials("relay")
    # One machine, one file: it holds that user's login and nobody else's.
    only = permissions.Rights.load(out / permissions.cred_file_name("echo"))
    assert only.credentials("echo") == r.credentials("echo") and not only.holds("relay")
    with pytest.raises(CouncilError, match=r"no credentials for 'relay'.*relay\.cred\.json"):
        only.credentials("relay")
    # A credential file from another `council rights` run does not pass for this one.
    other = permissions.rights("w1", council.edges(), serves=council.serves())
    other.write(tmp_path / "other")
    (out / "relay.cred.json").write_text((tmp_path / "other" / "relay.cred.json").read_text())
    with pytest.raises(CouncilError, match="different `council rights` runs"):
        permissions.Rights.load(out)
    # Secrets are never part of the rights' own serialization.
    assert r.credentials("echo")[1] not in r.model_dump_json()
