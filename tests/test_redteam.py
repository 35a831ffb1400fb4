"""The red-team suite for rights: attacks run from INSIDE an agent's REPL code in a real
session (real nats-server with the generated rights, real worker subprocess, scripted
model), written as an attacker would write them: the standard library and nats-py only,
with the worker's own NATS login fished out of its memory. Each attack must be refused
by the server (or, for a spoofed body, by the callee), and the session must go on.

The process and file attacks (environ, ~/.ssh, ports, children, output caps) are in
tests/test_sandbox.py; the forged oversize Ref in tests/test_store.py.
"""

from __future__ import annotations

import anyio
import nats
import pytest

from agents.human import HumanDesk
from agents.models import ScriptedModel
from channels import permissions
from channels.server import embedded_server
from channels.store import kv_bucket, stream_name
from council.declare import Agent, Council, Function, Human
from council.session import Session

pytestmark = pytest.mark.anyio


def word_count(text: str) -> int:
    return len(text.split())


def secret(text: str) -> str:
    return "the vault is open"


# What every attack starts with: the worker's own client object, found in its memory, and a
# fresh connection of the attacker's own on the same login (with an error callback, so the
# server's refusals are seen), driven by asyncio.run on the REPL's code thread.
PRELUDE = r"""
import asyncio, gc, json, os, re, time
import nats
from nats.aio.client import Client

me = next(o for o in gc.get_objects() if isinstance(o, Client) and o.is_connected)
URL = f"nats://{me.connected_url.hostname}:{me.connected_url.port}"
USER, PASSWORD = me.options["user"], me.options["password"]
S, NAME = USER.split(".", 1)
ERRORS = []

async def on_error(e):
    ERRORS.append(str(e).lower())

async def login(user=None, password=None, **kw):
    return await nats.connect(
        URL, user=user, password=password, error_cb=on_error, allow_reconnect=False,
        max_reconnect_attempts=0, connect_timeout=2, **kw)

async def outcome(aw):
    try:
        got = await aw
    except BaseException as e:
        return f"{type(e).__name__}: {e}"[:300]
    return f"ALLOWED: {got!r}"[:300]
"""

ATTACK = (
    "```python\n"
    + PRELUDE
    + r"""
async def attack():
    R = {"user": USER, "session": S}
    ctx = context
    # -- the server's config: find it from the server's argv, read it, use what it holds
    found = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError as e:
        pids, R["proc"] = [], f"{type(e).__name__}: {e}"
    for pid in pids:
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError as e:
            found.setdefault("proc_error", f"{type(e).__name__}: {e}")
            continue
        if argv and argv[0].endswith(b"nats-server") and b"-c" in argv:
            path = argv[argv.index(b"-c") + 1].decode()
            try:
                text = open(path).read()
            except OSError as e:
                found[path] = f"{type(e).__name__}: {e}"
                continue
            if f'"{S}.' in text:
                found[path] = text
    R["config"] = {p: (t if t.startswith(("PermissionError", "FileNotFound")) else "read")
                   for p, t in found.items() if p != "proc_error"}
    logins = re.findall(r'user: "([^"]+)", password: "([^"]+)"',
                        "".join(t for t in found.values()))
    R["config_users"] = sorted(u for u, _ in logins)
    R["config_secrets"] = sorted({p[:4] for _, p in logins})
    R["config_logins"] = {u: await outcome(login(u, p)) for u, p in logins}
    R["config_modes"] = {p: oct(os.stat(p).st_mode & 0o777) for p in R["config"]
                         if R["config"][p] == "read"}
    # -- connecting as another user, with what this process knows
    R["as_admin"] = await outcome(login(f"{S}:admin", PASSWORD))
    R["as_peer"] = await outcome(login(f"{S}.word_count", PASSWORD))
    R["anonymous"] = await outcome(login())
    # -- its own login works, and is held to its edges
    nc = await login(USER, PASSWORD, inbox_prefix=f"_INBOX.{S}.{NAME}")
    js = nc.jetstream(timeout=1.5)
    outside = f"council.{S}.call.secret.{NAME}"
    R["publish_outside"] = await outcome(nc.request(outside, b"{}", timeout=1))
    # -- listening in, also on the worker of another request of the same agent, and taking
    # its calls as one more member of its queue group
    SIB = "chair-repl-2" if NAME == "chair-repl" else "chair-repl"
    R["sibling"] = SIB
    for subject in [">", f"_INBOX.{S}.admin.>", f"council.{S}.call.word_count.*",
                    f"council.{S}.call.secret.*", f"council.{S}.call.chair.*",
                    f"$KV.council-human-{S}-ada.q.*", "$JS.API.>",
                    f"council.{S}.call.{SIB}.*", f"_INBOX.{S}.{SIB}.>"]:
        await nc.subscribe(subject)
    await nc.subscribe(f"council.{S}.call.{SIB}.chair", queue=SIB)
    await nc.flush()
    # -- spoofing the caller: in the subject (refused by the server), in the body (refused
    # by the callee, which believes the subject)
    body = json.dumps({"type": "call", "v": 1, "id": "spoof1", "session": S, "caller": "admin",
                       "callee": "word_count", "prompt": "one two"}).encode()
    R["spoof_subject"] = await outcome(
        nc.request(f"council.{S}.call.word_count.admin", body, timeout=1))
    try:
        msg = await nc.request(f"council.{S}.call.word_count.{NAME}", body, timeout=10)
        R["spoof_body"] = json.loads(msg.data)
    except Exception as e:
        R["spoof_body"] = f"{type(e).__name__}: {e}"
    # -- JetStream management, every kind, on this session's own streams and buckets
    from nats.js.api import StreamConfig
    store, kv, human = f"CSTORE_S_{S}", f"KV_cvars_{S}", f"council-human-{S}-ada"
    ops = {
        "stream_create": js.add_stream(name="EVIL", subjects=[f"council.{S}.>"]),
        "stream_update": js.update_stream(StreamConfig(name=store, subjects=["x.>"])),
        "stream_delete": js.delete_stream(store),
        "stream_purge": js.purge_stream(store),
        "stream_info": js.stream_info(store),
        "stream_list": js.streams_info(),
        "consumer_create": js.add_consumer(store, durable_name="spy"),
        "consumer_delete": js.delete_consumer(store, "spy"),
        "kv_create": js.create_key_value(bucket="evil"),
        "kv_delete": js.delete_key_value(f"cvars_{S}"),
        "kv_purge": js.purge_stream(kv),
        "human_bucket_delete": js.delete_key_value(human),
        "account_info": js.account_info(),
    }
    results = await asyncio.gather(*(outcome(op) for op in ops.values()))
    R["jetstream"] = dict(zip(ops, results))
    # -- a human's question: read it, answer it in the human's place
    q = ctx["question"]
    answer = json.dumps({"id": q, "text": "forged", "by": "repl"}).encode()
    R["human_answer"] = await outcome(js.publish(f"$KV.{human}.a.{q}", answer))
    R["human_read"] = await outcome(nc.request(
        f"$JS.API.DIRECT.GET.KV_{human}.$KV.{human}.q.{q}", b"", timeout=1))
    await asyncio.sleep(0.5)  # the server's -ERR lines arrive after the publishes
    await nc.close()
    R["errors"] = ERRORS
    return R

R = asyncio.run(attack())
# The session goes on: the agent's own edge still works after all that.
R["after"] = word_count("still working here")
FINAL(R)
```"""
)


def council(sandbox: str) -> Council:
    chair = {"model": "scripted", "calls": ["word_count"]}
    if "sandbox" in Agent.model_fields:  # rights hold with the REPL sandbox on or off
        chair["sandbox"] = sandbox
    return Council(
        entry="chair",
        peers=[Agent("chair", **chair), Function(word_count), Function(secret), Human("ada")],
    )


def refused(outcome: str) -> bool:
    return not outcome.startswith("ALLOWED")


@pytest.mark.parametrize("sandbox", ["off", "on"])
async def test_repl_code_is_held_to_its_rights(sandbox: str):
    """Every attack of ATTACK is refused, and the session goes on."""
    scripted = ScriptedModel([ATTACK, "```python\nFINAL('second request served')\n```"])
    async with Session(council(sandbox), models={"scripted": scripted}) as s:
        S = s.session
        # A question is waiting for ada; the attacker is told its id.
        asked: dict = {}

        async def ask_ada() -> None:
            asked["answer"] = (await s.client.call("ada", "Ship it?", timeout=60)).value

        s.call_in(ask_ada)
        desk = HumanDesk(s.client, "ada")
        with anyio.fail_after(10):
            while not (pending := await desk.pending()):
                await anyio.sleep(0.05)
        [question] = pending
        kept = await s.store.put("a value of this session")  # type: ignore[union-attr]

        result = await s.ask("attack", context={"question": question.id}, timeout=120)
        R = result.value
        assert isinstance(R, dict), R
        errors = "\n".join(R["errors"])

        def denied(verb: str, subject: str) -> bool:
            return f'permissions violation for {verb} to "{subject.lower()}"' in errors

        # The config: only bcrypt hashes (cost 4), mode 0600; no login in it works. With the
        # sandbox on, REPL code cannot even read it.
        read = [p for p, what in R["config"].items() if what == "read"]
        if sandbox == "off":
            assert read, R["config"]
        if read:
            assert set(R["config_modes"].values()) == {"0o600"}
            assert f"{S}:admin" in R["config_users"] and f"{S}.chair-repl" in R["config_users"]
            assert R["config_secrets"] == ["$2b$"]  # every password field is a bcrypt hash
            assert len(R["config_logins"]) == len(R["config_users"]) >= 5
            for user, got in R["config_logins"].items():
                assert "authorization violation" in got.lower(), (user, got)
        else:  # the sandbox: not even the list of processes, let alone the file
            assert sandbox == "on" and R["config_logins"] == {}
            assert R.get("proc", "").startswith("PermissionError") or all(
                w.startswith("PermissionError") for w in R["config"].values()
            ), R
        # Another user's name with this process's password, or no login at all: refused.
        for key in ("as_admin", "as_peer", "anonymous"):
            assert "authorization violation" in R[key].lower(), (key, R[key])
        # Outside its edges: refused by the server.
        assert refused(R["publish_outside"])
        assert denied("publish", f"council.{S}.call.secret.chair-repl")
        for subject in (">", f"_INBOX.{S}.admin.>", f"council.{S}.call.word_count.*"):
            assert denied("subscription", subject), subject
        for subject in (f"council.{S}.call.secret.*", f"council.{S}.call.chair.*"):
            assert denied("subscription", subject), subject
        assert denied("subscription", f"$KV.council-human-{S}-ada.q.*")
        # Another request's REPL worker: not heard, not impersonated (one login per name).
        sib = R["sibling"]
        assert denied("subscription", f"council.{S}.call.{sib}.*")
        assert denied("subscription", f"_INBOX.{S}.{sib}.>")
        assert denied("subscription", f"council.{S}.call.{sib}.chair")
        assert denied("subscription", "$JS.API.>")
        # The caller is who the subject says: another name there is refused by the server,
        # and a body claiming another caller is refused by the callee.
        assert refused(R["spoof_subject"])
        assert denied("publish", f"council.{S}.call.word_count.admin")
        spoof = R["spoof_body"]
        assert isinstance(spoof, dict) and spoof.get("kind") == "permission_denied", spoof
        assert "claims to be from 'admin'" in spoof["message"]
        # JetStream management: every call refused, each named by the server.
        for op, got in R["jetstream"].items():
            assert refused(got), (op, got)
        store, kv = stream_name(S), f"KV_{kv_bucket(S)}"
        for subject in (
            "$JS.API.STREAM.CREATE.EVIL",
            f"$JS.API.STREAM.UPDATE.{store}",
            f"$JS.API.STREAM.DELETE.{store}",
            f"$JS.API.STREAM.PURGE.{store}",
            f"$JS.API.STREAM.INFO.{store}",
            f"$JS.API.CONSUMER.DELETE.{store}.spy",
            "$JS.API.STREAM.CREATE.KV_evil",
            f"$JS.API.STREAM.DELETE.{kv}",
            f"$JS.API.STREAM.PURGE.{kv}",
            f"$JS.API.STREAM.DELETE.KV_{permissions.human_bucket(S, 'ada')}",
            "$JS.API.INFO",
        ):
            assert denied("publish", subject), subject
        assert 'permissions violation for publish to "$js.api.consumer.' in errors
        assert "$js.api.stream.list" in errors or "$js.api.stream.names" in errors
        # The human's bucket: neither answered nor read by the REPL.
        assert refused(R["human_answer"]) and refused(R["human_read"])
        bucket = permissions.human_bucket(S, "ada")
        assert denied("publish", f"$KV.{bucket}.a.{question.id}")

        # The session went on: the REPL's own edge worked after the attacks, ...
        assert R["after"] == 3
        # ... the store and its streams are intact, nothing was created, ...
        assert await s.store.get(kept) == "a value of this session"  # type: ignore[union-attr]
        js = s.client.nc.jetstream(timeout=5)
        names = {i.config.name for i in await js.streams_info()}
        assert {store, kv, f"KV_{bucket}"} <= names and "EVIL" not in names
        assert "KV_evil" not in names
        assert [c.name for c in await js.consumers_info(store)] == []
        # ... the question is still open, and only the person's endpoint answers it, ...
        assert "answer" not in asked
        desk_bus = await s.connect(council("off").peer("ada").desk)  # type: ignore[union-attr]
        await HumanDesk(desk_bus, "ada").answer(question, "yes, ship it")
        with anyio.fail_after(20):
            while "answer" not in asked:
                await anyio.sleep(0.05)
        assert asked["answer"] == "yes, ship it"
        # ... and the agent serves the next request.
        again = await s.ask("again", timeout=60)
        assert again.value == "second request served"


CROSS = (
    "```python\n"
    + PRELUDE
    + r"""
async def attack():
    R = {}
    other, ref, var = context["session"], context["hex"], context["variable"]
    nc = await login(USER, PASSWORD, inbox_prefix=f"_INBOX.{S}.{NAME}")
    js = nc.jetstream(timeout=1.5)
    stream, bucket = f"CSTORE_S_{other}", f"cvars_{other}"
    R["read_value"] = await outcome(nc.request(
        f"$JS.API.DIRECT.GET.{stream}.cstore.s.{other}.{ref}.m", b"", timeout=1))
    R["read_by_seq"] = await outcome(nc.request(
        f"$JS.API.DIRECT.GET.{stream}", json.dumps({"seq": 1}).encode(), timeout=1))
    R["read_variable"] = await outcome(nc.request(
        f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{var}", b"", timeout=1))
    R["write_variable"] = await outcome(js.publish(f"$KV.{bucket}.{var}", b'{"v": "pwned"}'))
    R["write_value"] = await outcome(js.publish(f"cstore.s.{other}.{ref}.m", b"pwned"))
    R["call_there"] = await outcome(nc.request(
        f"council.{other}.call.word_count.{NAME}", b"{}", timeout=1))
    R["listen_there"] = await outcome(nc.subscribe(f"council.{other}.>"))
    await nc.flush()
    await asyncio.sleep(0.5)
    await nc.close()
    R["errors"] = ERRORS
    return R

FINAL(asyncio.run(attack()))
```"""
)


async def test_two_sessions_on_one_server_cannot_reach_each_other():
    """Session A's REPL code can neither read nor write session B's values and variables,
    nor call or listen in B, on a server both use."""
    a = permissions.rights("sa" + _tag(), council("off").edges(), **_shape())
    b = permissions.rights("sb" + _tag(), council("off").edges(), **_shape())
    users = a.authorization().rsplit("  ]", 1)[0] + "\n".join(
        f"    {u.entry()}" for u in [b.admin, *b.users.values()]
    )
    config = users + "\n  ]\n}\n"
    async with embedded_server(config_extra=config) as server:
        scripted = ScriptedModel([CROSS])
        async with (
            Session(council("off"), nats_url=server.url, rights=b) as sb,
            Session(
                council("off"), nats_url=server.url, rights=a, models={"scripted": scripted}
            ) as sa,
        ):
            assert sb.store is not None and sa.store is not None
            ref = await sb.store.put("session B's secret")
            await sb.store.bind("plan", "B's plan")
            # The attack aims at where B's data really is: B's runner reads it there.
            B = sb.session
            there = await sb.client.nc.request(
                f"$JS.API.DIRECT.GET.{stream_name(B)}.cstore.s.{B}.{ref.hex}.m", b"", timeout=5
            )
            assert there.data == b"session B's secret"
            var = await sb.client.nc.request(
                f"$JS.API.DIRECT.GET.KV_{kv_bucket(B)}.$KV.{kv_bucket(B)}.plan", b"", timeout=5
            )
            assert b"B's plan" in var.data

            context = {"session": B, "hex": ref.hex, "variable": "plan"}
            R = (await sa.ask("cross", context=context, timeout=120)).value
            errors = "\n".join(R["errors"])
            for key in ("read_value", "read_by_seq", "read_variable", "write_variable"):
                assert refused(R[key]), (key, R[key])
            for key in ("write_value", "call_there"):
                assert refused(R[key]), (key, R[key])
            for subject in (
                f"$JS.API.DIRECT.GET.{stream_name(B)}.cstore.s.{B}.{ref.hex}.m",
                f"$JS.API.DIRECT.GET.{stream_name(B)}",
                f"$JS.API.DIRECT.GET.KV_{kv_bucket(B)}.$KV.{kv_bucket(B)}.plan",
                f"$KV.{kv_bucket(B)}.plan",
                f"cstore.s.{B}.{ref.hex}.m",
                f"council.{B}.call.word_count.chair-repl",
            ):
                assert f'permissions violation for publish to "{subject.lower()}"' in errors
            assert f'subscription to "council.{B.lower()}.>"' in errors
            # B is untouched and goes on.
            assert await sb.store.get(ref) == "session B's secret"
            assert await sb.store.lookup("plan") == "B's plan"
            assert (await sb.client.call("word_count", "b still works", timeout=10)).value == 3


def _tag() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def _shape() -> dict:
    c = council("off")
    return {"serves": c.serves(), "slots": c.slots(), "humans": c.desks()}


async def test_a_stolen_config_grants_nothing_even_to_raw_nats():
    """Outside any REPL too: every password field of the generated config is a bcrypt hash,
    none of them logs in, and each real password logs in only as its own user."""
    r = permissions.rights("cfg" + _tag(), council("off").edges(), **_shape())
    conf = r.authorization()
    for u in [r.admin, *r.users.values()]:
        assert f'password: "{u.password_hash}"' in conf and u.password_hash.startswith("$2b$04$")
        assert r.credentials(u.peer)[1] not in conf
    async with embedded_server(config_extra=conf) as server:
        conf_file = server._workdir / "nats.conf"
        assert conf_file.stat().st_mode & 0o777 == 0o600
        assert server._workdir.stat().st_mode & 0o777 == 0o700
        for u in [r.admin, r.users["chair-repl"]]:
            with pytest.raises(Exception, match=r"(?i)authorization violation"):
                await nats.connect(
                    server.url,
                    user=u.user,
                    password=u.password_hash,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                )
            user, password = r.credentials(u.peer)
            nc = await nats.connect(server.url, user=user, password=password)
            await nc.close()


_SECRETS: dict[str, str] = {}


def inspect(text: str) -> list[str]:
    """A function peer (it runs in the test's process) that looks, while the REPL worker
    that called it is alive, for any password of the session in every descendant process's
    argv and environment and in the session's temporary files."""
    import os
    import tempfile
    from pathlib import Path

    from council.session import children

    pids, todo = set(), [os.getpid()]
    while todo:
        for child in children(todo.pop()):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    found = [f"{len(pids)} processes"]
    for pid in pids:
        for part in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{part}").read_bytes().decode(errors="replace")
            except OSError:
                continue
            found += [f"{peer} in {pid}/{part}" for peer, pw in _SECRETS.items() if pw in data]
    for d in Path(tempfile.gettempdir()).glob("council-*"):
        for f in d.rglob("*") if d.is_dir() else []:
            if f.is_file() and f.stat().st_size < 1_000_000 and f.stat().st_mtime > START[0]:
                data = f.read_text(errors="replace")
                found += [f"{peer} in {f}" for peer, pw in _SECRETS.items() if pw in data]
    return found


START = [0.0]
LOOK = "```python\nFINAL(inspect('now'))\n```"


async def test_no_password_in_any_argv_environment_or_session_file():
    """With a REPL worker alive, none of the session's passwords appears in the argv or
    environment of any process the session started (server, worker) or in its files."""
    import time

    START[0] = time.time() - 1
    c = Council(
        entry="chair",
        peers=[Agent("chair", model="scripted", calls=["inspect"]), Function(inspect)],
    )
    async with Session(c, models={"scripted": ScriptedModel([LOOK])}) as s:
        assert s.rights is not None
        for peer in [permissions.ADMIN, *s.rights.users]:
            _SECRETS[peer] = s.rights.credentials(peer)[1]
        found = (await s.ask("look", timeout=60)).value
    _SECRETS.clear()
    count, *leaks = found
    assert int(count.split()[0]) >= 2, found  # the server and the REPL worker at least
    assert leaks == [], leaks
