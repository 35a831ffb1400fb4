"""The shared store against a real nats-server: round trips, integrity, scope, CAS, spill."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import anyio
import nats
import nats.js.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.models import ScriptedModel
from channels.errors import (
    BudgetExhausted,
    IntegrityError,
    InvalidName,
    NotFound,
    NotProvisioned,
    PeerError,
    StoreError,
    StoreForbidden,
    StoreUnavailable,
    TooLarge,
    UnsupportedValue,
)
from channels.messages import Call, Ref
from channels.server import NatsServer, running_server
from channels.store import (
    KEPT_STREAM,
    META_HEADER,
    RETRY_AFTER,
    Store,
    _chunk_digests,
    _location,
    _Meta,
    default_replicas,
    peer_subjects,
    stream_name,
)
from council.declare import Agent, Council, Function
from council.session import Session

pytestmark = pytest.mark.anyio

SMALL_CHUNK = 64  # so that a few hundred bytes already cross several chunk boundaries


@pytest.fixture
async def nc(nats_server) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
async def admin(nc, session_id) -> Store:
    """The runner's view: it created the session's store, it may keep, delete and drop."""
    return await Store.provision(nc, scope=session_id, chunk_size=SMALL_CHUNK)


@pytest.fixture
async def store(admin, nc, session_id) -> Store:
    """A peer's view of the same session's store: it only opens it."""
    return await Store.open(nc, scope=session_id, chunk_size=SMALL_CHUNK)


async def record_meta(store: Store, ref: Ref) -> _Meta:
    record = await store._record(ref.scope, ref.hex)
    assert record is not None
    return _Meta.model_validate_json(record.headers["Council-Meta"])


# -- round trips ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
boundary_sizes = st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129, 64 * 7, 64 * 7 + 1])


@settings(
    max_examples=int(os.environ.get("STORE_EXAMPLES", "25")),  # raise it for a deeper search
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    texts=st.lists(st.text(st.characters(exclude_categories=())), max_size=4),  # + surrogates
    blobs=st.lists(st.binary(max_size=600), max_size=4),
    docs=st.lists(json_values, max_size=4),
    size=boundary_sizes,
    char=st.characters(),
)
async def test_round_trip_any_text_bytes_json(store, texts, blobs, docs, size, char):
    values = [
        *texts,
        *blobs,
        *docs,
        os.urandom(size),
        char * size,  # multi-byte characters split across chunk boundaries
        {"items": ["x" * size]},
    ]
    for value in values:
        ref = await store.put(value)
        back = await store.get(ref)
        assert back == value and type(back) is type(value)
        assert ref.digest == "sha256:" + hashlib.sha256(await store.read_bytes(ref)).hexdigest()
        parts = [p async for p in store.stream(ref)]
        assert b"".join(parts) == await store.read_bytes(ref)
        assert all(len(p) <= SMALL_CHUNK for p in parts) or len(parts) == 1


async def test_empty_values_keep_their_kind(store):
    for value, kind in (("", "text"), (b"", "bytes"), ([], "json"), ({}, "json"), (None, "json")):
        ref = await store.put(value)
        assert (ref.kind, ref.size) == (kind, len(json.dumps(value)) if kind == "json" else 0)
        assert await store.get(ref) == value and type(await store.get(ref)) is type(value)


async def test_refs_inside_json_come_back_as_refs(store):
    inner = await store.put("inner text")
    ref = await store.put({"doc": inner, "n": 1.0, "t": True})
    back = await store.get(ref)
    assert back == {"doc": inner, "n": 1.0, "t": True}
    assert isinstance(back["doc"], Ref) and isinstance(back["n"], float)


async def test_repr_shows_kind_size_preview_never_the_value(store):
    secret_tail = "TAIL-NOT-SHOWN"
    ref = await store.put("head " + "x" * 10_000 + secret_tail)
    shown = repr(ref)
    assert "text" in shown and "10.0 KB" in shown and "head" in shown
    assert secret_tail not in shown and len(shown) < 300
    blob = await store.put(bytes(range(256)) * 10)
    assert "bytes" in repr(blob) and len(repr(blob)) < 300


async def test_unsupported_values_and_names_get_typed_errors(store):
    with pytest.raises(UnsupportedValue, match="convert sets to lists"):
        await store.put({1, 2})
    with pytest.raises(UnsupportedValue):
        await store.put(float("nan"))
    with pytest.raises(NotFound, match="not in"):
        await store.get(
            Ref.model_validate({"$ref": "sha256:" + "0" * 64, "size": 1, "kind": "text"})
        )
    with pytest.raises(NotFound, match="bind it first"):
        await store.lookup("never-bound")
    with pytest.raises(InvalidName):
        await store.bind("bad name", 1)


async def test_identical_values_are_stored_once(store, nc):
    js = nc.jetstream()
    flt = f"{_location(store.scope)}.>"

    async def stored() -> int:
        info = await js.stream_info(stream_name(store.scope), subjects_filter=flt)
        return sum((info.state.subjects or {}).values())

    value = os.urandom(SMALL_CHUNK * 20 + 3)
    first = await store.put(value)
    after_first = await stored()
    assert after_first == 20 + 1 + 1  # 21 chunks and one record
    again = await store.put(bytes(value))
    assert again == first and await stored() == after_first


async def test_racing_puts_of_one_value_leave_one_copy(admin, store, nc):
    """The runner removes a losing upload's chunks; a peer may not purge, so its losers'
    chunks stay (unreachable: no record names them) until the session is dropped."""
    for who, left in ((admin, 50 + 1), (store, None)):
        value = os.urandom(SMALL_CHUNK * 50)
        refs: list[Ref] = []
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(_put, who, value, refs)
        assert len(set(refs)) == 1
        assert await store.get(refs[0]) == value
        info = await nc.jetstream().stream_info(
            stream_name(store.scope), subjects_filter=f"{_location(store.scope)}.{refs[0].hex}.>"
        )
        assert left is None or sum(info.state.subjects.values()) == left


async def _put(store: Store, value: object, out: list[Ref]) -> None:
    out.append(await store.put(value))


# -- integrity -----------------------------------------------------------------------------


async def test_replaced_chunk_is_an_integrity_error(store, nc):
    value = os.urandom(SMALL_CHUNK * 10)
    ref = await store.put(value)
    meta = await record_meta(store, ref)
    js = nc.jetstream()
    # rewrite chunk 3: delete it and publish different bytes onto the same chunk subject
    await js.delete_msg(stream_name(store.scope), meta.first + 3)
    subject = f"{_location(store.scope)}.{ref.hex}.d.{meta.upload}.3"
    await js.publish(subject, b"y" * SMALL_CHUNK)
    with pytest.raises(IntegrityError):
        await store.get(ref)
    seen: list[bytes] = []
    with pytest.raises(IntegrityError):
        async for part in store.stream(ref):
            seen.append(part)
    assert b"".join(seen) == value[: len(b"".join(seen))]  # nothing wrong was ever yielded


async def test_a_stream_can_stop_early_and_the_value_stays_readable(store):
    value = os.urandom(SMALL_CHUNK * 10)
    ref = await store.put(value)
    async with aclosing(store.stream(ref)) as parts:
        async for part in parts:
            assert part == value[:SMALL_CHUNK]
            break
    assert await store.get(ref) == value


async def test_extra_message_on_chunk_subject_never_changes_the_value(store, nc):
    value = os.urandom(SMALL_CHUNK * 4)
    ref = await store.put(value)
    meta = await record_meta(store, ref)
    for i in (2, 4, "x"):  # after the last chunk: a repeat, one past the end, no index
        subject = f"{_location(store.scope)}.{ref.hex}.d.{meta.upload}.{i}"
        await nc.jetstream().publish(subject, b"junk")
    assert await store.get(ref) == value


async def test_truncated_value_is_an_integrity_error(store, nc):
    ref = await store.put(os.urandom(SMALL_CHUNK * 6 + 5))
    meta = await record_meta(store, ref)
    await nc.jetstream().delete_msg(stream_name(store.scope), meta.last)
    with pytest.raises(IntegrityError, match="truncated"):
        await store.read_bytes(ref)


async def test_rewritten_inline_record_is_an_integrity_error(store, nc):
    ref = await store.put("short")  # fits inline in its record
    record = await store._record(ref.scope, ref.hex)
    await nc.jetstream().publish(
        record.headers["Nats-Subject"],
        b"shorT",
        headers={"Council-Meta": record.headers["Council-Meta"]},
    )
    with pytest.raises(IntegrityError, match="corrupted"):
        await store.get(ref)
    with pytest.raises(IntegrityError):
        async for _ in store.stream(ref):
            pass


# -- scale and memory ----------------------------------------------------------------------


async def test_many_windows_stream_and_bounded_memory(admin, nc, session_id):
    """Same code path as a 1 GB value: default chunks, several read windows."""
    store = await Store.open(nc, scope=session_id)
    value = os.urandom(40 * 1024 * 1024 + 12345)
    ref = await store.put(value)
    assert (await record_meta(store, ref)).chunks > 64  # more than two 16 MiB windows
    size = 0
    async for part in store.stream(ref):
        assert len(part) <= store.chunk_size
        size += len(part)
    assert size == len(value)
    del value
    tracemalloc.start()
    try:
        data = await store.read_bytes(ref)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hashlib.sha256(data).hexdigest() == ref.hex
    assert peak <= 2.5 * ref.size, f"peak {peak / ref.size:.2f}x the value size"


# -- durability, scope ---------------------------------------------------------------------


async def test_values_and_variables_survive_a_server_restart(own_server, session_id):
    nc = await nats.connect(own_server.url)
    store = await Store.provision(nc, scope=session_id, chunk_size=SMALL_CHUNK)
    values = ["inline", os.urandom(SMALL_CHUNK * 9 + 1), {"k": ["v"] * 50}]
    refs = [await store.put(v) for v in values]
    kept = await store.put("kept", keep=True)
    await store.bind("notes", ["a", "b"])
    await nc.close()

    own_server.restart()

    nc = await nats.connect(own_server.url)
    try:
        store = await Store.open(nc, scope=session_id, chunk_size=SMALL_CHUNK)
        for v, ref in zip(values, refs, strict=True):
            assert await store.get(ref) == v
        assert await store.get(kept) == "kept"
        assert await store.lookup("notes") == ["a", "b"]
    finally:
        await nc.close()


async def test_drop_removes_the_session_and_keeps_kept_data(nc, session_id):
    mine = await Store.provision(nc, scope=session_id, chunk_size=SMALL_CHUNK)
    other = await Store.provision(nc, scope=session_id + "x", chunk_size=SMALL_CHUNK)
    small, big = await mine.put("small"), await mine.put(os.urandom(SMALL_CHUNK * 5))
    kept = await mine.put({"keep": True}, keep=True)
    theirs = await other.put("small")
    await mine.bind("n", 1)
    await other.bind("n", 2)
    assert kept.scope == "" and small.scope == session_id

    await mine.drop()

    js = nc.jetstream()
    for name in (stream_name(session_id), f"KV_cvars_{session_id}"):
        with pytest.raises(nats.js.errors.NotFoundError):  # nothing of the session is left
            await js.stream_info(name)
    with pytest.raises(NotProvisioned):
        await Store.open(nc, scope=session_id, timeout=1)
    kept_reader = await Store.open(nc, scope=session_id + "x")
    assert await kept_reader.get(kept) == {"keep": True}
    assert await other.get(theirs) == "small" and await other.lookup("n") == 2
    await mine.drop()  # twice is fine
    again = await Store.provision(nc, scope=session_id, chunk_size=SMALL_CHUNK)
    for ref in (small, big):  # a session of the same name starts empty
        assert not await again.exists(ref)
        with pytest.raises(NotFound):
            await again.get(ref)
    assert await again.lookup("n", None) is None
    assert await again.get(kept) == {"keep": True}


async def test_a_value_already_kept_is_not_stored_again(admin, store):
    kept = await admin.put("shared text", keep=True)
    again = await store.put("shared text")
    assert again.scope == "" and again.digest == kept.digest
    await admin.drop()
    reader = await Store.provision(admin.nc, scope=admin.scope)
    assert await reader.get(again) == "shared text"


# -- named variables -----------------------------------------------------------------------


async def test_bind_lookup_update_and_big_values(store):
    rev = await store.bind("notes", {"a": 1})
    assert rev > 0 and await store.lookup("notes") == {"a": 1}
    assert await store.update("notes", lambda d: {**d, "b": 2}) == {"a": 1, "b": 2}
    assert await store.update("fresh", lambda n: n + 1, default=0) == 1
    ref = await store.put("by reference")
    await store.bind("doc", ref)
    assert await store.lookup("doc") == ref  # a bound Ref stays a Ref
    big = "z" * 200_000
    await store.bind("big", big)
    assert await store.lookup("big") == big
    await store.bind("raw", b"\x00\xff")
    assert await store.lookup("raw") == b"\x00\xff"


HAMMER = textwrap.dedent(
    """
    import sys, anyio, nats
    from channels.store import Store

    async def main(url, scope, tasks, each):
        nc = await nats.connect(url)
        store = await Store.open(nc, scope=scope)
        async def worker():
            for _ in range(each):
                await store.update("count", lambda n: n + 1, default=0)
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)
        await nc.close()

    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    """
)


async def test_cas_hammer_from_tasks_and_processes_loses_no_write(nats_server, store, clean_env):
    tasks, each, procs = 10, 10, 2
    cmd = [sys.executable, "-c", HAMMER, nats_server.url, store.scope, "5", str(each)]
    env = {**clean_env, "PYTHONPATH": os.getcwd()}

    async def worker():
        for _ in range(each):
            await store.update("count", lambda n: n + 1, default=0)

    async def child():
        with anyio.fail_after(60):
            await anyio.run_process(cmd, env=env, check=True, stdout=None, stderr=None)

    async with anyio.create_task_group() as tg:
        for _ in range(procs):
            tg.start_soon(child)
        for _ in range(tasks):
            tg.start_soon(worker)
    assert await store.lookup("count") == tasks * each + procs * 5 * each


# -- on the bus ----------------------------------------------------------------------------


class Spy:
    """A raw connection that records the size of every call and reply of a session."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.replies: list[int] = []

    async def attach(self, url: str, session: str) -> nats.NATS:
        nc = await nats.connect(url)

        async def on_call(msg):
            self.calls.append(len(msg.data))

        async def on_reply(msg):  # the inboxes also carry store traffic: keep bus replies
            if msg.data.startswith(b'{"type":"reply"'):
                self.replies.append(len(msg.data))

        await nc.subscribe(f"council.{session}.call.>", cb=on_call)
        await nc.subscribe(f"_INBOX.{session}.>", cb=on_reply)
        await nc.flush()
        return nc


async def test_passing_a_ref_costs_the_same_bytes_whatever_the_size(
    connect, nats_server, session_id
):
    peer, client = await connect("reader"), await connect("client")
    spy = Spy()
    spy_nc = await spy.attach(nats_server.url, session_id)
    store = await client.store()
    small = await store.put("a" * 1_000)
    large = await store.put("a" * 10_000_000)

    async def reader(call: Call):
        assert isinstance(call.context, Ref)
        return {"size": call.context.size}  # passes it on without reading it

    async with anyio.create_task_group() as tg:
        await tg.start(peer.serve, "reader", reader)
        for ref in (small, large):
            reply = await client.call("reader", "how big?", context=ref, timeout=10)
            assert reply.value == {"size": ref.size}
        tg.cancel_scope.cancel()
    await spy_nc.flush()
    await anyio.sleep(0.05)
    await spy_nc.close()
    assert len(spy.calls) == 2 and len(spy.replies) == 2
    assert abs(spy.calls[0] - spy.calls[1]) <= 8  # only the size's digits differ
    assert abs(spy.replies[0] - spy.replies[1]) <= 8
    assert max(spy.calls) < 1_500


async def test_bus_spills_big_context_args_and_reply(connect, nats_server, session_id):
    peer, client = await connect("echo"), await connect("client")
    spy = Spy()
    spy_nc = await spy.attach(nats_server.url, session_id)
    document = "line of text\n" * 100_000  # 1.3 MB, over max_payload
    seen: list[Call] = []

    async def echo(call: Call):
        seen.append(call)
        store = await peer.store()
        parts = [call.context, call.args.get("tail", "")]
        return "".join([await store.get(p) if isinstance(p, Ref) else p for p in parts])

    async with anyio.create_task_group() as tg:
        await tg.start(peer.serve, "echo", echo)
        reply = await client.call("echo", "repeat", context=document, timeout=20)
        assert reply.value == document and not reply.spilled
        kept = await client.call("echo", "repeat", context=document, timeout=20, keep_refs=True)
        assert kept.spilled and isinstance(kept.value, Ref) and kept.value.size == len(document)
        assert await (await client.store()).get(kept.value) == document
        long_prompt = await client.call("echo", "p" * 300_000, context="c", timeout=20)
        assert long_prompt.value == "c"  # a big prompt alone is sent inline, nothing spilled
        extra = await client.call(
            "echo", "x", context="short", args={"tail": "t" * 400_000}, timeout=20
        )
        assert extra.value == "short" + "t" * 400_000
        tg.cancel_scope.cancel()
    await spy_nc.flush()
    await anyio.sleep(0.05)
    await spy_nc.close()
    assert isinstance(seen[0].context, Ref) and seen[0].context.size == len(document)
    assert seen[2].context == "c" and seen[2].prompt == "p" * 300_000
    assert isinstance(seen[3].args["tail"], Ref) and seen[3].context == "short"
    assert max(spy.replies) < 2048 and len(spy.replies) == 4
    assert sorted(spy.calls)[-2] < 2048  # only the call with the big prompt was big


async def test_a_failure_with_a_big_partial_result_sends_it_by_ref(connect):
    peer, client = await connect("worker"), await connect("client")
    partial = {"done": ["row"] * 200_000}  # ~1.4 MB of partial work

    async def give_up(call: Call):
        raise BudgetExhausted("ran out of budget", partial=partial)

    async with anyio.create_task_group() as tg:
        await tg.start(peer.serve, "worker", give_up)
        with pytest.raises(BudgetExhausted) as failed:
            await client.call("worker", "go", timeout=20)
        tg.cancel_scope.cancel()
    assert isinstance(failed.value.partial, Ref)  # nothing is lost: it is in the store
    assert await (await client.store()).get(failed.value.partial) == partial


# -- isolation: one stream and bucket per session, peers on data-plane subjects only --------

PEER_PW = "peer-pw"


def _user(user: str, publish: list[str], subscribe: list[str]) -> str:
    return (
        f"{{user: {json.dumps(user)}, password: {json.dumps(PEER_PW)}, permissions: "
        f"{{publish: {{allow: {json.dumps(publish)}}}, subscribe: {{allow: {json.dumps(subscribe)}}}}}}}"
    )


def _authorization(*sessions: str) -> str:
    """The runner may do anything; peer `p` of each session gets `peer_subjects` only (plus
    its inbox), which is what channels/permissions.py grants for the store."""
    users = [f'{{user: "admin", password: {json.dumps(PEER_PW)}}}']
    for s in sessions:
        publish, subscribe = peer_subjects(s)
        users.append(_user(f"{s}.p", publish, [*subscribe, f"_INBOX.{s}.p.>"]))
    return "authorization { users: [\n" + ",\n".join(users) + "\n] }\n"


async def _peer(url: str, session: str) -> nats.NATS:
    return await nats.connect(
        url, user=f"{session}.p", password=PEER_PW, inbox_prefix=f"_INBOX.{session}.p"
    )


async def _refused(nc: nats.NATS, subject: str, body: bytes = b"") -> None:
    """The server drops a request outside the user's rights: no answer ever comes."""
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subject, body, timeout=0.5)


async def test_a_peer_reaches_its_own_sessions_store_and_nothing_else():
    a, b = "sessA", "sessB"
    with running_server(config_extra=_authorization(a, b)) as server:
        root = await nats.connect(server.url, user="admin", password=PEER_PW)
        runner_a = await Store.provision(root, scope=a, chunk_size=SMALL_CHUNK)
        runner_b = await Store.provision(root, scope=b, chunk_size=SMALL_CHUNK)
        kept = await runner_a.put("kept for later sessions", keep=True)
        secret = os.urandom(SMALL_CHUNK * 5)
        b_ref = await runner_b.put(secret)
        await runner_b.bind("secret", "b's variable")
        nc = await _peer(server.url, a)
        try:
            peer = await Store.open(nc, scope=a, chunk_size=SMALL_CHUNK, timeout=2)
            # its own session: the whole data plane, chunked values, variables, CAS
            value = os.urandom(SMALL_CHUNK * 7 + 1)
            ref = await peer.put(value)
            assert await peer.get(ref) == value and await runner_a.get(ref) == value
            assert b"".join([p async for p in peer.stream(ref)]) == value
            await peer.bind("n", 1)
            assert await peer.update("n", lambda n: n + 1) == 2 and await peer.lookup("n") == 2
            assert await peer.get(kept) == "kept for later sessions"  # kept values: read only

            # another session: not by Ref, not by sequence, not by key, not by opening it
            with pytest.raises(NotFound):
                await peer.get(b_ref)
            with pytest.raises(NotProvisioned):
                await Store.open(nc, scope=b, timeout=1)
            b_stream = stream_name(b)
            for seq in (1, 2, 6):
                await _refused(
                    nc, f"$JS.API.DIRECT.GET.{b_stream}", json.dumps({"seq": seq}).encode()
                )
            await _refused(nc, f"$JS.API.DIRECT.GET.{b_stream}.{_location(b)}.{b_ref.hex}.m")
            await _refused(nc, f"$JS.API.DIRECT.GET.KV_cvars_{b}.$KV.cvars_{b}.secret")
            await _refused(nc, f"$KV.cvars_{b}.secret", b'{"v": "overwritten"}')
            await _refused(nc, f"{_location(b)}.{b_ref.hex}.m", b"forged")

            # no management, even of its own session; no kept values
            for api in (
                f"STREAM.DELETE.{stream_name(a)}",
                f"STREAM.PURGE.{stream_name(a)}",
                f"STREAM.INFO.{stream_name(a)}",
                f"STREAM.UPDATE.{stream_name(a)}",
                f"STREAM.DELETE.KV_cvars_{a}",
                f"STREAM.PURGE.{KEPT_STREAM}",
                "STREAM.CREATE.CAPTURE",
                "STREAM.LIST",
                f"CONSUMER.CREATE.{stream_name(b)}",
                "INFO",
            ):
                await _refused(nc, f"$JS.API.{api}", b"{}")
            await _refused(nc, f"{_location('')}.{'0' * 64}.m", b"forged kept value")
            with pytest.raises(StoreForbidden):
                await peer.put("keep me", keep=True)
            for admin_only in (peer.drop(), peer.delete(ref)):
                with pytest.raises(StoreForbidden):
                    await admin_only

            # everything is where it was
            assert await runner_b.get(b_ref) == secret
            assert await runner_b.lookup("secret") == "b's variable"
            assert await runner_a.get(ref) == value and await runner_a.lookup("n") == 2
            js = root.jetstream()
            assert (await js.stream_info(KEPT_STREAM)).state.messages == 1
            names = {i.config.name for i in await js.streams_info()}
            assert "CAPTURE" not in names
        finally:
            await nc.close()
            await root.close()


# -- forged Refs: the size is the store's, reads are bounded by the reader -----------------

GiB = 1024**3


async def test_a_forged_oversize_ref_allocates_nothing(admin, store, nc):
    real = await store.put("a small honest value")
    claim = int(1.5 * GiB)
    # a peer may write records in its own session: one that claims 1.5 GiB of chunks it never stored
    hexd = hashlib.sha256(b"forged").hexdigest()
    chunk = 512 * 1024
    meta = _Meta(
        size=claim, kind="bytes", chunks=-(-claim // chunk), chunk=chunk, first=1, last=10**9,
        upload="f0rged",
    )  # fmt: skip
    await nc.jetstream().publish(
        f"{_location(store.scope)}.{hexd}.m",
        b"\0" * 32,
        headers={"Council-Meta": meta.model_dump_json()},
    )
    forged = Ref.model_validate({"$ref": f"sha256:{hexd}", "size": claim, "kind": "bytes"})
    inflated = real.model_copy(update={"size": claim})  # a real digest, a lying size
    # under the limit, in one-byte chunks: nothing sized by the chunk count either
    tiny_hex, tiny_size = hashlib.sha256(b"tiny").hexdigest(), 900_000_000
    tiny_meta = _Meta(
        size=tiny_size, kind="bytes", chunks=tiny_size, chunk=1, first=1, last=10**9,
        upload="t1ny",
    )  # fmt: skip
    await nc.jetstream().publish(
        f"{_location(store.scope)}.{tiny_hex}.m",
        b"\0" * 32,
        headers={"Council-Meta": tiny_meta.model_dump_json()},
    )
    tiny = Ref.model_validate({"$ref": f"sha256:{tiny_hex}", "size": tiny_size, "kind": "bytes"})

    tracemalloc.start()
    try:
        for ref in (forged, inflated):
            with pytest.raises(TooLarge, match="over this reader's limit"):
                await store.get(ref)  # the default limit is under 1.5 GiB
        with pytest.raises(TooLarge):
            await store.get(real, limit=5)
        with pytest.raises(IntegrityError, match="the Ref says"):  # limit allows: size differs
            await store.get(inflated, limit=2 * GiB)
        with pytest.raises(IntegrityError, match="truncated"):  # limit allows: no chunks there
            await store.read_bytes(forged, limit=2 * GiB)
        with pytest.raises(IntegrityError, match="truncated"):
            await store.read_bytes(tiny)
        for ref in (forged, tiny):  # a stream has no size limit: it holds one window at most
            with pytest.raises(IntegrityError):
                async for _ in store.stream(ref):
                    pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"reading forged Refs peaked at {peak / 1e6:.0f} MB"
    assert await store.get(real) == "a small honest value"


# -- compare-and-set under retries ---------------------------------------------------------


async def test_a_re_sent_compare_and_set_write_counts_once(store, nc):
    """A compare-and-set write whose ack is lost is re-sent; the server then refuses it
    (the revision moved: by this very write). `update` must see that the write landed and
    not apply `fn` a second time. Here the first send is swallowed after it reached the
    server (its reply inbox unsubscribed), as a restart between store and ack would do."""
    await store.bind("count", 0)
    real = nc.request
    lost = 0

    async def ack_lost_once(subject, payload=b"", timeout=None, headers=None, **kw):
        nonlocal lost
        if (
            subject.startswith("$KV.")
            and headers
            and "Nats-Expected-Last-Subject-Sequence" in headers
            and not lost
        ):
            lost += 1
            await nc.publish(subject, payload, headers=headers)  # lands, no one hears the ack
            await nc.flush()
            raise nats.errors.TimeoutError
        return await real(subject, payload, timeout=timeout, headers=headers, **kw)

    nc.request = ack_lost_once
    calls = 0

    def bump(n: int) -> int:
        nonlocal calls
        calls += 1
        return n + 1

    try:
        assert await store.update("count", bump) == 1
    finally:
        del nc.request
    assert lost == 1 and calls == 1
    assert await store.lookup("count") == 1  # written once, not twice
    assert await store.update("count", lambda n: n + 1) == 2


# -- faults: a transfer cut by a server restart resumes, or fails typed --------------------

MB = 1024 * 1024
DEADLINE = 20.0  # the store's timeout: no progress for this long is a StoreUnavailable


def _kill_and_start(server: NatsServer) -> None:
    """SIGKILL, then the same binary on the same port and store: a crashed server back."""
    proc, server.process = server.process, None
    assert proc is not None
    proc.kill()
    proc.wait()
    server.start()


async def _reconnecting(url: str) -> nats.NATS:
    return await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)


async def test_a_40mb_put_and_get_cut_by_a_restart_resume(own_server, session_id):
    nc = await _reconnecting(own_server.url)
    await Store.provision(nc, scope=session_id)
    store = await Store.open(nc, scope=session_id, timeout=DEADLINE)
    value = os.urandom(40 * MB)
    real = nc.publish
    cut_at: dict[str, int] = {}
    sent: dict[str, int] = {"chunk": 0, "window": 0}

    async def cutting(subject, payload=b"", reply="", headers=None):
        await real(subject, payload, reply=reply, headers=headers)
        kind = "chunk" if ".d." in subject else "window" if "DIRECT.GET" in subject else ""
        if kind:
            sent[kind] += 1
            if sent[kind] == cut_at.get(kind):
                _kill_and_start(own_server)  # mid-transfer: some chunks acked, some not

    nc.publish = cutting
    try:
        cut_at["chunk"] = 30  # of 80
        started = time.monotonic()
        ref = await store.put(value)
        put_s = time.monotonic() - started
        assert sent["chunk"] > 80  # unacknowledged chunks were sent again
        cut_at["window"] = 2  # of 3 read windows (16 MiB each)
        started = time.monotonic()
        back = await store.read_bytes(ref)
        get_s = time.monotonic() - started
    finally:
        del nc.publish
    assert back == value
    assert put_s < DEADLINE and get_s < DEADLINE, (put_s, get_s)
    print(f"40 MB cut by a restart: put {put_s:.2f}s, get {get_s:.2f}s")
    # and one more cut, mid-stream: the chunks already yielded are not yielded again
    got = bytearray()
    async for part in store.stream(ref):
        got += part
        if len(got) == 10 * store.chunk_size:
            _kill_and_start(own_server)
    assert got == value
    await nc.close()


async def test_a_transfer_that_cannot_resume_fails_typed_within_its_deadline(
    own_server, session_id
):
    """The server goes and stays gone: a put and a get raise StoreUnavailable (a StoreError,
    never an ExceptionGroup) once nothing moved for the store's timeout, and the message
    says what happened without advising to delete anything."""
    nc = await _reconnecting(own_server.url)
    await Store.provision(nc, scope=session_id)
    store = await Store.open(nc, scope=session_id, timeout=3)
    ref = await store.put(os.urandom(20 * MB))
    own_server.stop()
    try:
        for attempt in (store.put(os.urandom(20 * MB)), store.read_bytes(ref), store.lookup("x")):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as failed:
                await attempt
            assert time.monotonic() - started < 3 + RETRY_AFTER + 5
            assert "retry" in str(failed.value) and "delete" not in str(failed.value).lower()
    finally:
        own_server.start()
    await store.put("and once it is back, the store works again")
    await nc.close()


async def test_a_store_failure_reaches_a_remote_caller_readably(connect, nats_server, session_id):
    reader, client = await connect("reader"), await connect("client")
    ref = await (await client.store()).put(os.urandom(2 * MB))

    async def read(call: Call):
        store = await Store.open(reader.nc, scope=session_id, timeout=1)
        runner = await Store.provision(reader.nc, scope=session_id)  # the test plays the runner:
        await runner.drop()  # the session's stream goes away under the reader
        return len(await store.read_bytes(call.context))

    async with anyio.create_task_group() as tg:
        await tg.start(reader.serve, "reader", read)
        with pytest.raises(PeerError) as failed:
            await client.call("reader", "size?", context=ref, timeout=30)
        tg.cancel_scope.cancel()
    message = str(failed.value)
    assert "StoreUnavailable" in message and "did not answer within 1" in message
    assert "ExceptionGroup" not in message and "delete" not in message.lower()


async def test_replicas_default_to_one_on_a_single_server(nc, session_id):
    assert default_replicas(nc) == 1
    await Store.provision(nc, scope=session_id)
    info = await nc.jetstream().stream_info(stream_name(session_id))
    assert info.config.num_replicas == 1
    with pytest.raises(StoreError, match="a cluster of at least that many servers"):
        await Store.provision(nc, scope=session_id + "r3", replicas=3, timeout=5)


# -- a replicated store on a 3-node cluster ------------------------------------------------


def shout(prompt: str, context: str) -> str:
    """Reads its context from the store (a Ref) and answers with a value too big for a
    message, which the bus puts in the store: a read and a write per call."""
    return prompt + context.upper() * 4


async def test_losing_the_store_leader_loses_nothing(cluster):
    """SIGKILL the node holding the store's stream leader while the runner writes and reads
    40 MB values, between calls that read and write the store: nothing is lost and the
    session goes on (calls, values, variables) on the two nodes left."""
    council = Council(entry="shout", peers=[Function(shout)])
    async with Session(council, nats_url=cluster.url) as session:
        assert default_replicas(session.client.nc) == 3  # asked the server: a cluster of 3
        js = session.client.nc.jetstream()
        info = await js.stream_info(stream_name(session.session))
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        leader = info.cluster.leader
        store = session.store
        refs: list[Ref] = []
        old, new = os.urandom(40 * MB), os.urandom(40 * MB)
        big = await store.put(old)
        for i in range(6):
            if i == 3:
                back: list[bytes] = []
                written: list[Ref] = []
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_into, back, store.read_bytes(big))
                    tg.start_soon(_into, written, store.put(new))
                    await anyio.sleep(0.05)
                    assert not written  # 40 MB on three nodes: still going
                    cluster.kill(cluster.names().index(leader))
                assert back == [old] and await store.read_bytes(written[0]) == new
            doc = f"document {i} " + "x" * 300_000  # over the inline limit: sent as a Ref
            result = await session.ask("shout", context=doc, timeout=60)
            assert result.value == "shout" + doc.upper() * 4
            refs.append(await store.put(f"value {i} " + "y" * 600_000))
            await store.update("asked", lambda n: n + 1, default=0)
        assert await store.lookup("asked") == 6
        for i, ref in enumerate(refs):
            assert await store.get(ref) == f"value {i} " + "y" * 600_000
        after = await js.stream_info(stream_name(session.session))
        assert after.cluster.leader not in (None, leader)


async def _into(out: list, work) -> None:
    out.append(await work)


CLI_COUNCIL = """
from council.declare import Council, Function

def echo(prompt: str) -> str:
    return prompt

council = Council(entry="echo", peers=[Function(echo)])
"""


async def test_council_run_takes_the_replica_count(cluster, tmp_path, clean_env):
    path = tmp_path / "echo_council.py"
    path.write_text(CLI_COUNCIL)
    council_cli = Path(sys.executable).parent / "council"
    cmd = [
        str(council_cli), "--log-level", "info", "run", f"{path}:council", "--nats", cluster.url,
        "--replicas", "2", "--no-record", "--prompt", "hello", "--json",
    ]  # fmt: skip
    with anyio.fail_after(120):
        done = await anyio.run_process(cmd, env=clean_env, check=False)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, err[-2000:]
    assert json.loads(done.stdout)["value"] == "hello"
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert {"event": "store.provisioned", "replicas": 2}.items() <= next(
        e for e in events if e["event"] == "store.provisioned"
    ).items()


def word_count(text: str) -> int:
    return len(text.split())


FORGE = """```python
import asyncio, gc, hashlib, json, nats
from nats.aio.client import Client

r = store.put("four words in here")
Ref = type(r)
forged = {
    "inflated": r.model_copy(update={"size": 1610612736}),  # a real digest, 1.5 GiB claimed
    "unknown": Ref.model_validate({"$ref": "sha256:" + "ab" * 32, "size": 900_000_000, "kind": "text"}),
}

# a record in its own session (its rights allow writing values there) claiming 1.5 GiB of
# chunks it never stored, written with the worker's own login fished out of its memory
me = next(o for o in gc.get_objects() if isinstance(o, Client) and o.is_connected)
USER, PASSWORD = me.options["user"], me.options["password"]
S, NAME = USER.split(".", 1)
hexd, size = hashlib.sha256(b"forged").hexdigest(), 1610612736
meta = {"size": size, "kind": "bytes", "chunks": size // 524288, "chunk": 524288,
        "first": 1, "last": 10**9, "upload": "f0rged"}

async def forge():
    nc = await nats.connect(f"nats://{me.connected_url.hostname}:{me.connected_url.port}",
                            user=USER, password=PASSWORD, inbox_prefix=f"_INBOX.{S}.{NAME}")
    ack = await nc.request(f"cstore.s.{S}.{hexd}.m", b"\\0" * 32, timeout=5,
                           headers={"Council-Meta": json.dumps(meta)})
    await nc.close()
    return json.loads(ack.data)

out = {"forged_record": asyncio.run(forge())}
forged["record"] = Ref.model_validate({"$ref": "sha256:" + hexd, "size": size, "kind": "bytes"})
out["honest"] = word_count(context=r)
for name, ref in forged.items():
    try:
        out[name] = word_count(context=ref)
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
FINAL(out)
```"""


def _reset_peak_rss() -> int:
    """Reset this process's resident-set high-water mark; its current size in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


async def test_repl_code_passing_a_forged_oversize_ref_makes_no_one_allocate_it():
    """The red-team case: REPL code hands a peer (a function served by the session process)
    Refs that lie about their size. The peer refuses them by what the store holds and its
    own limit; the session process's memory does not move, and the session goes on."""
    scripted = ScriptedModel([FORGE, "```python\nFINAL('still serving')\n```"])
    council = Council(
        entry="chair",
        peers=[Agent("chair", model="scripted", calls=["word_count"]), Function(word_count)],
    )
    async with Session(council, models={"scripted": scripted}) as s:
        start = _reset_peak_rss()
        result = await s.ask("count", timeout=120)
        grew_mb = (_status_kb("VmHWM") - start) / 1024
        out = result.value
        assert out["honest"] == 4, out
        assert "TooLarge" in out["inflated"] and "over this reader's limit" in out["inflated"]
        assert "NotFound" in out["unknown"], out
        assert out["forged_record"].get("seq"), out  # the forgery is in the store...
        assert "TooLarge" in out["record"], out  # ...and refused by what it claims
        assert grew_mb < 200, f"the session process grew by {grew_mb:.0f} MB"
        assert (await s.ask("again", timeout=120)).value == "still serving"


async def test_chunks_stored_out_of_order_read_back_in_order(store, nc):
    """What a write resumed after a restart leaves: chunks re-sent after later ones. Reads
    place them by index and `stream` yields them in order."""
    value = os.urandom(SMALL_CHUNK * 12 + 7)
    hexd = hashlib.sha256(value).hexdigest()
    prefix = f"{_location(store.scope)}.{hexd}.d.reord."
    order = [0, 2, 3, 1, 5, 4, 12, 6, 7, 8, 11, 9, 10]
    js = nc.jetstream()
    seqs = []
    for i in order:
        ack = await js.publish(prefix + str(i), value[i * SMALL_CHUNK : (i + 1) * SMALL_CHUNK])
        seqs.append(ack.seq)
    meta = _Meta(
        size=len(value), kind="bytes", chunks=13, chunk=SMALL_CHUNK, first=min(seqs),
        last=max(seqs), upload="reord",
    )  # fmt: skip
    assert await store._commit(store.scope, hexd, meta, _chunk_digests(value, SMALL_CHUNK))
    ref = Ref.model_validate({"$ref": f"sha256:{hexd}", "size": len(value), "kind": "bytes"})
    assert await store.get(ref) == value
    parts = [p async for p in store.stream(ref)]
    assert b"".join(parts) == value and len(parts) == 13


async def test_a_re_sent_record_never_loses_its_own_chunks(admin, nc):
    """The runner's write whose record ack was lost is re-sent and refused (the record is
    there: its own). Even when the record then reads as absent (a replica behind the new
    leader), the runner must not take it for another writer's and remove its chunks."""
    real_request, real_record = nc.request, admin._record
    value = os.urandom(SMALL_CHUNK * 8)
    swallowed = 0
    lagging = False

    async def ack_lost(subject, payload=b"", timeout=None, headers=None, **kw):
        nonlocal swallowed, lagging
        if subject.endswith(".m") and headers and META_HEADER in headers and not swallowed:
            swallowed += 1
            await nc.publish(subject, payload, headers=headers)  # lands; its ack is lost
            await nc.flush()
            lagging = True
            raise nats.errors.TimeoutError
        return await real_request(subject, payload, timeout=timeout, headers=headers, **kw)

    async def behind(scope, hexd):
        return None if lagging else await real_record(scope, hexd)

    nc.request, admin._record = ack_lost, behind
    try:
        ref = await admin.put(value)
    finally:
        del nc.request
        admin._record = real_record
    assert swallowed == 1
    assert await admin.get(ref) == value  # its chunks are all there
