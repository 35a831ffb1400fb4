"""The shared variable store: values by content address, named variables by compare-and-set.

Peers pass `Ref`s, not values, so a 40 MB document crosses the bus as a few hundred bytes
and is read only by whoever needs it. Everything lives in JetStream (file storage, so it
survives a server restart; `replicas` copies on a cluster, so it survives losing a node).

Layout: one stream and one KV bucket per session, so that a peer's rights can be the exact
data-plane subjects of its own session (`peer_subjects`): a direct get by sequence on its
session's stream cannot reach another session's data, and no peer needs any
`$JS.API.STREAM.*` right.

- stream `CSTORE_S_<session>`, subjects `cstore.s.<session>.>`:
      cstore.s.<session>.<hex>.m                 the value's record (one message; see below)
      cstore.s.<session>.<hex>.d.<upload>.<i>    chunk i, when it does not fit inline
- stream `CSTORE_K`, subjects `cstore.k.>`: the same for kept values (outlive every
  session). Only the runner writes there; every peer may read it (see `peer_subjects`).
- KV bucket `cvars_<session>`, keys `<name>`, for named mutable variables.

A record's `Council-Meta` header holds size, kind, chunk size and where the chunks are;
its payload is the value itself when it fits in one chunk, else the sha256 of every chunk.
Creating and deleting streams and buckets is the runner's (`Store.provision`, `drop`);
`Store.open` only opens.

Why not nats-py's Object Store: its get reads one message at a time through a consumer and
grows its result by concatenation (measured at ~16 MB/s). Here a write publishes every
chunk back to back and collects the acks as they come (a bounded window, no round trip
per chunk); a read asks for a window of chunks with one batched direct get and receives
them on one subscription, so the transfer is as fast as the socket and the hash.

Faults: every chunk carries a `Nats-Msg-Id` and its index in its subject, so a write cut
by a restart or a leader change re-sends what was not acknowledged (the stream drops
duplicates) and a read asks again from the last sequence it got, placing chunks by index.
Either finishes, or fails with `StoreUnavailable` once nothing has moved for `timeout`
seconds. A compare-and-set write carries a message id too: re-sent after a lost ack and
refused (the revision moved), it looks for its id in the revision after the one it
expected (the bucket keeps a few), so it is never applied twice. On a cluster a direct
get may be answered by a replica a little behind: a Ref's record, its chunks and a
variable this store already saw are asked for again until they show up.

Integrity: the record is written last and only if none exists (expected last subject
sequence 0), so a half-written or racing upload is never visible. A Ref's size is checked
against the record, the record against the reader's limit before anything is allocated,
and every read checks the sha256 of what it returns; `stream` also checks each chunk
before yielding it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from inspect import isawaitable
from math import inf
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StorageType
from pydantic import BaseModel, ConfigDict, ValidationError

from channels import log, subjects
from channels.errors import (
    IntegrityError,
    InvalidName,
    NotFound,
    NotProvisioned,
    StoreError,
    StoreForbidden,
    StoreUnavailable,
    TooLarge,
    UnsupportedValue,
)
from channels.messages import Ref, ValueKind
from channels.natsio import unsubscribe

_log = log.get("council.store")

PREFIX = "cstore"
STREAM_PREFIX = "CSTORE_S_"  # + session: one stream per session
KEPT_STREAM = "CSTORE_K"  # kept values, written by the runner only
KV_PREFIX = "cvars_"  # + session: one KV bucket per session
META_HEADER = "Council-Meta"

DEFAULT_CHUNK = 512 * 1024  # measured: 256 KiB is ~40% slower to write, 1 MiB no faster
WINDOW_BYTES = 16 * 1024 * 1024  # chunks asked for in one direct get; bounds read buffering
MAX_BATCH = 1024  # chunks per direct get, whatever their size
INFLIGHT_BYTES = 32 * 1024 * 1024  # unacknowledged chunk bytes a writer may have out
THREAD_HASH_BYTES = 8 * 1024 * 1024  # hash bigger values off the event loop
REORDER_BYTES = WINDOW_BYTES + INFLIGHT_BYTES  # out-of-order chunks `stream` may hold
KV_INLINE_BYTES = 64 * 1024  # a bound value bigger than this goes to the store as a Ref
PREVIEW_CHARS = 100
DEFAULT_TIMEOUT = 30.0  # an operation fails once nothing has moved for this long
DEFAULT_READ_LIMIT = 1024 * 1024 * 1024  # the biggest value a reader takes unless told
RETRY_AFTER = 2.0  # a read or write with no answer for this long asks again
FIRST_WAIT = 0.25  # the first wait for the answer to a small request (doubling to RETRY_AFTER)
OPEN_GRACE = 5.0  # how long `open` waits for a store that does not answer yet
LAG_GRACE = 10.0  # how long a reader on a cluster waits for a replica to catch up
CLUSTER_REPLICAS = 3
KV_HISTORY = 8  # revisions kept per variable: a re-sent compare-and-set finds its own write

_NAME = re.compile(r"[A-Za-z0-9_\-/=]+(\.[A-Za-z0-9_\-/=]+)*")
_WRONG_LAST_SEQUENCE = (10071, 10164)
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
)


def stream_name(scope: str) -> str:
    """The stream holding a session's values ("" = the kept values)."""
    return f"{STREAM_PREFIX}{subjects.check_name(scope, 'scope')}" if scope else KEPT_STREAM


def kv_bucket(scope: str) -> str:
    return f"{KV_PREFIX}{subjects.check_name(scope, 'scope')}"


def _location(scope: str) -> str:
    return f"{PREFIX}.s.{scope}" if scope else f"{PREFIX}.k"


def _direct(stream: str) -> list[str]:
    return [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>"]


def peer_subjects(session: str) -> tuple[list[str], list[str]]:
    """(publish, subscribe): exactly what a peer of `session` needs to use the store.

    Writes of its session's values and variables; direct gets (by sequence or by subject)
    on its session's stream and bucket, and on the kept values. Nothing of another
    session, and no JetStream management. Kept values are readable by every peer: they
    belong to no session (content-addressed, written only by the runner, meant to be
    read by later sessions); give tenants that must not see each other's kept values
    their own server or account. Replies come to the connection's own inbox, which the
    bus's rights already grant, so the subscribe list is empty.
    """
    bucket = kv_bucket(session)
    publish = [
        f"{_location(session)}.>",
        *_direct(stream_name(session)),
        *_direct(KEPT_STREAM),
        f"$KV.{bucket}.>",
        *_direct(f"KV_{bucket}"),
    ]
    return publish, []


def default_replicas(nc: NATS) -> int:
    """3 on a cluster of 3 or more servers (as the connected server reports it), else 1."""
    info = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    own = {f"{info.get('host')}:{info.get('port')}"}
    servers = own | set(info.get("connect_urls") or [])
    return CLUSTER_REPLICAS if len(servers) >= CLUSTER_REPLICAS else 1


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""`lookup(name, default=MISSING)` raises `NotFound` for an unbound name."""


class _Meta(BaseModel):
    """What the record message says about a stored value."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    size: int
    kind: ValueKind
    chunks: int = 0  # 0: the value is the record's payload
    chunk: int = 0  # bytes per chunk (the last may be shorter)
    first: int = 0  # stream sequences of the first and last chunk
    last: int = 0
    upload: str = ""
    preview: str = ""


# -- values <-> bytes ----------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Ref):
        return obj.model_dump(by_alias=True)
    raise TypeError(f"{type(obj).__name__} is not JSON-able")


def _json_hook(obj: dict[str, Any]) -> Any:
    if "$ref" in obj:
        try:
            return Ref.model_validate(obj)
        except ValidationError:
            pass
    return obj


def encode_value(value: Any) -> tuple[ValueKind, bytes]:
    """The bytes a value is stored (and addressed) as, and its kind."""
    if isinstance(value, str):
        # surrogatepass: any Python str round-trips, lone surrogates included
        return "text", value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes", bytes(value)
    try:
        text = json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default
        )
    except (TypeError, ValueError) as e:
        raise UnsupportedValue(
            f"cannot store a {type(value).__name__}: {e}; store text, bytes, or JSON data "
            "(dicts with string keys, lists, numbers, booleans, None), e.g. convert sets to lists"
        ) from None
    return "json", text.encode("utf-8", "surrogatepass")


def decode_value(kind: str, data: bytes) -> Any:
    if kind == "text":
        return data.decode("utf-8", "surrogatepass")
    if kind == "bytes":
        return data
    return json.loads(data, object_hook=_json_hook)


def _preview(kind: ValueKind, value: Any, data: bytes) -> str:
    if kind == "bytes":
        head = data[: PREVIEW_CHARS // 2].hex()
        return head + ("..." if len(data) > PREVIEW_CHARS // 2 else "")
    text = value if kind == "text" else data[: PREVIEW_CHARS * 4].decode("utf-8", "replace")
    head = text[:PREVIEW_CHARS]
    head = head.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates in a preview
    return head + ("..." if len(text) > PREVIEW_CHARS else "")


def _chunk_digests(data: bytes, chunk: int) -> bytes:
    view = memoryview(data)
    return b"".join(
        hashlib.sha256(view[i : i + chunk]).digest() for i in range(0, len(data), chunk)
    )


def _sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


async def _digest(data: bytes) -> str:
    if len(data) >= THREAD_HASH_BYTES:  # hashlib drops the GIL: other peers keep running
        return await anyio.to_thread.run_sync(_sha256_hex, data)
    return _sha256_hex(data)


def _check_var(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 200:
        raise InvalidName(
            f"variable name {name!r} is not usable: use 1-200 letters, digits, '-', '_', '/', "
            "'=' and '.' (not at either end, not doubled)"
        )
    return name


# -- the store -----------------------------------------------------------------------------


class Store:
    """One session's view of the shared store, on a caller's NATS connection.

    `scope` is the session id: what is put here is removed by `drop()` when the session
    ends, unless the runner put it with `keep=True`. Refs of this session and kept Refs can
    be read. A store from `open` is a peer's; one from `provision` is the runner's (admin),
    the only one that may keep, delete and drop.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        scope: str,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float = DEFAULT_TIMEOUT,
        read_limit: int = DEFAULT_READ_LIMIT,
        admin: bool = False,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=timeout)
        self.scope = subjects.check_name(scope, "scope")
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.read_limit = read_limit
        self.admin = admin
        self.bucket = kv_bucket(scope)
        # On a cluster a direct get may be answered by a replica a little behind the leader:
        # a Ref held (so committed) or a revision seen is waited for that long, not denied.
        self.lag = LAG_GRACE if (getattr(nc, "_server_info", None) or {}).get("cluster") else 0.0
        self._seen: dict[str, int] = {}  # variable -> newest revision this store wrote or read
        self._log = _log.bind(scope=scope)

    @classmethod
    async def open(
        cls,
        nc: NATS,
        *,
        scope: str,
        chunk_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        read_limit: int = DEFAULT_READ_LIMIT,
    ) -> Store:
        """Open a session's store as a peer: creates nothing, uses only data-plane subjects.
        Raises `NotProvisioned` if the runner has not created it."""
        store = cls(
            nc, scope=scope, chunk_size=_chunk(nc, chunk_size), timeout=timeout,
            read_limit=read_limit,
        )  # fmt: skip
        await store._probe()
        return store

    @classmethod
    async def provision(
        cls,
        nc: NATS,
        *,
        scope: str,
        replicas: int | None = None,
        chunk_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        read_limit: int = DEFAULT_READ_LIMIT,
    ) -> Store:
        """Create the session's stream and bucket and the kept-values stream (idempotent),
        with `replicas` copies (default: `default_replicas`); the runner's (admin) call."""
        replicas = replicas or default_replicas(nc)
        js = nc.jetstream(timeout=timeout)
        try:
            with anyio.fail_after(timeout):
                await _ensure_stream(js, stream_name(scope), _location(scope), replicas)
                await _ensure_stream(js, KEPT_STREAM, _location(""), replicas)
                await _ensure_stream(js, f"KV_{kv_bucket(scope)}", "", replicas)
        except (nats.errors.Error, TimeoutError) as e:
            raise StoreError(
                f"cannot create the store of session {scope!r} with {replicas} replica(s): "
                f"{e or type(e).__name__}; the server needs JetStream enabled (`council run` "
                "starts one that has it), and a cluster of at least that many servers"
            ) from e
        _log.info("store.provisioned", scope=scope, replicas=replicas)
        return cls(
            nc, scope=scope, chunk_size=_chunk(nc, chunk_size), timeout=timeout,
            read_limit=read_limit, admin=True,
        )  # fmt: skip

    # -- values ----------------------------------------------------------------------------

    async def put(self, value: Any, *, keep: bool = False) -> Ref:
        """Store a value once (by content) and return its Ref; `keep` (runner only) makes
        it outlive the session."""
        if keep:
            self._require_admin("keep a value beyond the session")
        kind, data = encode_value(value)
        hexd = await _digest(data)
        scope = "" if keep else self.scope
        ref = Ref.model_validate(
            {
                "$ref": f"sha256:{hexd}",
                "size": len(data),
                "kind": kind,
                "preview": _preview(kind, value, data),
                "scope": scope,
            }
        )
        if await self._record(scope, hexd) is not None:
            return ref
        if scope and await self._record("", hexd) is not None:
            return ref.model_copy(update={"scope": ""})  # already kept: no second copy
        await self._upload(scope, hexd, kind, data, ref.preview)
        return ref

    async def get(self, ref: Ref, *, limit: int | None = None) -> Any:
        """The value, decoded per `ref.kind`; raises `NotFound`, `IntegrityError`, `TooLarge`
        (bigger than `limit`, default the store's `read_limit`) or `StoreUnavailable`."""
        data = await self._read(ref, limit)
        if ref.kind == "bytes" and not isinstance(data, bytes):
            data = bytes(data)
        return decode_value(ref.kind, data)  # text and JSON decode straight from the buffer

    async def read_bytes(self, ref: Ref, *, limit: int | None = None) -> bytes:
        data = await self._read(ref, limit)
        return data if isinstance(data, bytes) else bytes(data)

    async def _read(self, ref: Ref, limit: int | None) -> bytes | bytearray:
        """The value's checked bytes: chunks are copied into one buffer (its size taken from
        the record, within the limit) as they arrive, and hashed in order as they land --
        in a thread, window by window, for a big value."""
        scope, record, meta = await self._locate(ref, limit)
        hasher = hashlib.sha256()
        if not meta.chunks:
            async for _, part in self._parts(scope, ref.hex, record, meta):
                data: bytes | bytearray = part
            hasher.update(data)
        else:
            data = bytearray()  # sized once the first chunk is really there (not on a claim)
            view = memoryview(data)
            have: set[int] = set()  # grows with what arrives, not with what a record claims
            done = hashed = 0  # chunks in place from the start; bytes hashed
            big = meta.size >= THREAD_HASH_BYTES
            send, receive = anyio.create_memory_object_stream[memoryview](max_buffer_size=inf)

            async def hash_windows() -> None:
                async with receive:
                    async for window in receive:
                        await anyio.to_thread.run_sync(hasher.update, window)

            try:
                async with anyio.create_task_group() as tg:
                    if big:
                        tg.start_soon(hash_windows)
                    async with send:
                        async for i, part in self._parts(scope, ref.hex, record, meta):
                            if not data:
                                view.release()
                                data = bytearray(meta.size)
                                view = memoryview(data)
                            off = i * meta.chunk
                            view[off : off + len(part)] = part
                            have.add(i)
                            while done in have:
                                done += 1
                            end = min(done * meta.chunk, meta.size)
                            if big and end - hashed >= WINDOW_BYTES:
                                send.send_nowait(view[hashed:end])
                                hashed = end
                        if big:
                            send.send_nowait(view[hashed:])
            except BaseExceptionGroup as group:  # one typed error, never a group
                raise _single(group) from None
            if not big:
                hasher.update(view)
            view.release()
        hexd = hasher.hexdigest()
        if hexd != ref.hex:
            raise IntegrityError(
                f"{ref!r} is corrupted: its bytes hash to sha256:{hexd[:16]}...; "
                "the stored value cannot be trusted, put it again from its source"
            )
        return data

    async def stream(self, ref: Ref) -> AsyncIterator[bytes]:
        """The value's bytes chunk by chunk, in order, each checked before it is yielded.

        Memory stays at about one read window whatever the size. The whole-value digest is
        checked at the end too (a record rewritten with matching fake chunks fails there).
        """
        scope, record, meta = await self._locate(ref, inf)
        digests = record.data if meta.chunks else b""
        if meta.chunks and len(digests) != 32 * meta.chunks:
            raise IntegrityError(f"{ref!r}: its record lists the wrong number of chunk digests")
        hasher = hashlib.sha256()
        early: dict[int, bytes] = {}  # chunks that came before their turn (after a retry)
        held = i = 0
        async for at, part in self._parts(scope, ref.hex, record, meta):
            if meta.chunks:
                if hashlib.sha256(part).digest() != digests[32 * at : 32 * at + 32]:
                    raise IntegrityError(f"{ref!r}: chunk {at} is corrupted")
            elif _sha256_hex(part) != ref.hex:
                raise IntegrityError(f"{ref!r} is corrupted")
            early[at] = part
            held += len(part)
            if held > REORDER_BYTES:  # a writer never has more than this out of order
                raise IntegrityError(f"{ref!r}: its chunks are stored too far out of order")
            while i in early:
                part = early.pop(i)
                held -= len(part)
                hasher.update(part)
                i += 1
                yield part
        if hasher.hexdigest() != ref.hex:
            raise IntegrityError(f"{ref!r} is corrupted (whole-value digest differs)")

    async def exists(self, ref: Ref) -> bool:
        try:
            await self._locate(ref, inf)
        except NotFound:
            return False
        return True

    async def delete(self, ref: Ref) -> None:
        """Remove the value from the scope the Ref names (runner only; a no-op if absent)."""
        self._require_admin("delete a value")
        await self._purge(ref.scope, f"{_location(ref.scope)}.{ref.hex}.>")

    async def drop(self) -> None:
        """Delete the session's stream and bucket (runner only); kept values stay."""
        self._require_admin("drop a session's store")
        for name in (stream_name(self.scope), f"KV_{self.bucket}"):
            try:
                await self.js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
            except nats.errors.Error as e:
                raise StoreError(f"could not delete the store of {self.scope!r}: {e}") from e
        self._log.info("store.dropped")

    def _require_admin(self, what: str) -> None:
        if not self.admin:
            raise StoreForbidden(
                f"only the runner may {what}; a peer's store (Store.open) reads and writes its "
                "own session's values and variables"
            )

    # -- named variables (per-session KV bucket, compare-and-set) ---------------------------

    async def bind(self, name: str, value: Any) -> int:
        """Set `name` (in this session) to a value or Ref; returns the new revision."""
        data = await self._var_encode(value)
        revision = await self._kv_write(_check_var(name), data, last=None)
        assert revision is not None
        return revision

    async def lookup(self, name: str, default: Any = MISSING) -> Any:
        data, _ = await self._kv_read(_check_var(name))
        if data is None:
            if default is MISSING:
                raise NotFound(
                    f"no variable {name!r} in scope {self.scope!r}; bind it first, or pass "
                    "a default to lookup()"
                )
            return default
        return await self._var_decode(data)

    async def update(
        self, name: str, fn: Callable[[Any], Any | Awaitable[Any]], *, default: Any = None
    ) -> Any:
        """Compare-and-set loop: `fn(old)` (old is `default` when unbound) becomes the value
        only if nobody changed it meanwhile, else `fn` runs again on the newer value. Keep
        `fn` free of side effects for that reason. Returns the value written."""
        key = _check_var(name)
        attempt = 0
        while True:
            data, revision = await self._kv_read(key)
            old = default if data is None else await self._var_decode(data)
            new = fn(old)
            if isawaitable(new):
                new = await new
            if await self._kv_write(key, await self._var_encode(new), last=revision) is not None:
                return new
            attempt += 1
            # back off a little so many writers converge instead of all retrying at once
            await anyio.sleep(random.random() * min(0.0005 * attempt, 0.02))

    async def _kv_read(self, key: str) -> tuple[bytes | None, int]:
        """(value or None when unbound or deleted, the revision to compare against); never
        older than a revision this store already wrote or read (read-your-writes)."""
        end = time.monotonic() + self.lag
        while True:
            msg = await self._request(
                f"$JS.API.DIRECT.GET.KV_{self.bucket}.$KV.{self.bucket}.{key}",
                b"",
                what=f"read {key!r}",
            )
            headers = msg.headers or {}
            status = headers.get("Status")
            if status and status != "404":
                raise StoreError(f"could not read {key!r}: the store answered status {status}")
            revision = 0 if status else int(headers.get("Nats-Sequence", 0))
            if revision >= self._seen.get(key, 0) or time.monotonic() >= end:
                break
            await anyio.sleep(0.05)  # a replica behind the leader answered: ask again
        self._seen[key] = max(revision, self._seen.get(key, 0))
        if status or headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None, revision
        return msg.data, revision

    async def _kv_write(self, key: str, data: bytes, *, last: int | None) -> int | None:
        """Write a variable; with `last`, only if its revision is still `last` (None: it
        moved on). The message id makes a write re-sent after a lost ack count once."""
        write_id = uuid.uuid4().hex
        headers = {"Nats-Msg-Id": write_id}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        subject = f"$KV.{self.bucket}.{key}"
        msg, resent = await self._send(subject, data, headers, what=f"write {key!r}")
        ack = await self._ack(msg)
        if ack is not None:
            self._seen[key] = max(int(ack["seq"]), self._seen.get(key, 0))
            return int(ack["seq"])
        if last is None or not resent:
            return None
        # Re-sent and refused: did the first send land (its ack lost)? Then the next
        # revision after `last` is this very write, and it must not be applied again.
        after = await self._request(
            f"$JS.API.DIRECT.GET.KV_{self.bucket}",
            json.dumps({"seq": last + 1, "next_by_subj": subject}).encode(),
            what=f"check a write of {key!r}",
        )
        if after.headers and after.headers.get("Nats-Msg-Id") == write_id:
            return int(after.headers.get("Nats-Sequence", 0))
        return None

    async def _var_encode(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            try:
                data = json.dumps({"v": value}, allow_nan=False, default=_json_default).encode()
            except (TypeError, ValueError):
                data = b""  # put() below raises the typed error
            if data and len(data) <= KV_INLINE_BYTES:
                return data
        ref = await self.put(value)
        return json.dumps({"r": ref.model_dump(by_alias=True)}).encode()

    async def _var_decode(self, data: bytes) -> Any:
        try:
            envelope = json.loads(data, object_hook=_json_hook)
            ref = Ref.model_validate(envelope["r"]) if "r" in envelope else None
            value = envelope["v"] if ref is None else None
        except (ValueError, TypeError, KeyError) as e:
            raise IntegrityError(f"a named variable holds unreadable data: {e}") from None
        return value if ref is None else await self.get(ref)  # a big value bind() stored

    # -- requests, with retries ------------------------------------------------------------

    async def _probe(self) -> None:
        """One direct get on the session's stream: absent (no responder) means never
        provisioned, or a server still starting; give the latter a few seconds."""
        subject = f"$JS.API.DIRECT.GET.{stream_name(self.scope)}.{_location(self.scope)}._"
        end = time.monotonic() + min(self.timeout, OPEN_GRACE)
        while True:
            try:
                await self.nc.request(subject, b"", timeout=max(0.1, end - time.monotonic()))
                return
            except nats.errors.NoRespondersError:
                if time.monotonic() >= end:
                    break
                await anyio.sleep(0.1)
            except nats.errors.TimeoutError:
                break
            except nats.errors.Error as e:
                raise StoreUnavailable(f"cannot reach the store: {e or type(e).__name__}") from e
        raise NotProvisioned(
            f"the store of session {self.scope!r} does not answer: the runner creates it "
            "(a Session does; or `await Store.provision(nc, scope=...)` on an admin "
            "connection), or the NATS server is still starting (retry)"
        )

    async def _request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, what: str
    ) -> Msg:
        return (await self._send(subject, payload, headers, what=what))[0]

    async def _send(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, what: str
    ) -> tuple[Msg, bool]:
        """A request re-sent while the store does not answer (restart, leader election),
        until `timeout`; then one `StoreUnavailable`. Also says whether it was re-sent (a
        write may then have landed already, its ack lost)."""
        end = time.monotonic() + self.timeout
        resent = False
        wait = FIRST_WAIT  # a small request answers in milliseconds: ask again soon, then less
        while True:
            left = end - time.monotonic()
            try:
                msg = await self.nc.request(
                    subject, payload, timeout=max(0.05, min(wait, left)), headers=headers
                )
                return msg, resent
            except _TRANSIENT as e:
                resent = True
                wait = min(2 * wait, RETRY_AFTER)
                reason = type(e).__name__
                if isinstance(e, nats.errors.TimeoutError):
                    pass  # the request itself waited
                else:
                    await anyio.sleep(min(0.1, max(0.0, left)))
            except nats.errors.Error as e:  # connection closed or draining: final
                raise StoreUnavailable(
                    f"could not {what}: the NATS connection is gone ({e or type(e).__name__})"
                ) from e
            if time.monotonic() >= end:
                raise StoreUnavailable(
                    f"could not {what}: the store did not answer within {self.timeout}s "
                    f"(last: {reason}); the NATS server may be restarting or electing a "
                    "stream leader: nothing was lost, retry when it is back"
                )

    def _reconnects(self) -> int:
        return int(self.nc.stats.get("reconnects", 0))

    async def _wait(self, wake: anyio.Event, reconnects: int) -> None:
        """Until `wake`, `RETRY_AFTER` seconds, or the connection came back from a
        reconnect (what was in flight then may be lost: the caller asks again at once)."""
        end = time.monotonic() + RETRY_AFTER
        while not wake.is_set() and time.monotonic() < end:
            with anyio.move_on_after(min(0.1, max(0.0, end - time.monotonic()))):
                await wake.wait()
            if self._reconnects() != reconnects:
                return

    async def _ack(self, msg: Msg) -> dict[str, Any] | None:
        """A JetStream publish ack; None when an expected-sequence check failed."""
        try:
            ack = json.loads(msg.data)
        except ValueError:
            raise StoreError(f"the store sent an unreadable ack: {msg.data[:200]!r}") from None
        error = ack.get("error")
        if error is None:
            return ack
        if error.get("err_code") in _WRONG_LAST_SEQUENCE:
            return None
        raise StoreError(f"the store refused a write: {error.get('description', error)}")

    # -- records and chunks ----------------------------------------------------------------

    async def _record(self, scope: str, hexd: str) -> Msg | None:
        """The record message of a value in one scope, or None."""
        subject = f"$JS.API.DIRECT.GET.{stream_name(scope)}.{_location(scope)}.{hexd}.m"
        msg = await self._request(subject, b"", what=f"read value sha256:{hexd[:16]}...")
        status = msg.headers.get("Status") if msg.headers else None
        if status == "404":
            return None
        if status:
            raise StoreError(f"the store answered a read with status {status}: {msg.headers}")
        return msg

    async def _locate(self, ref: Ref, limit: float | None) -> tuple[str, Msg, _Meta]:
        """Where a value is and what its record says, checked against the Ref and the
        reader's limit before anything is read."""
        limit = self.read_limit if limit is None else limit
        if ref.size > limit:
            raise TooLarge(_too_large(ref, ref.size, limit))
        end = time.monotonic() + self.lag
        for scope in dict.fromkeys((ref.scope, self.scope, "")):
            if scope not in (self.scope, ""):
                continue  # another session's value: not reachable from here
            record = await self._record(scope, ref.hex)
            while record is None and scope == ref.scope and time.monotonic() < end:
                await anyio.sleep(0.05)  # a replica behind the leader answered: ask again
                record = await self._record(scope, ref.hex)
            if record is None:
                continue
            try:
                meta = _Meta.model_validate_json((record.headers or {})[META_HEADER])
            except (KeyError, ValidationError):
                raise IntegrityError(f"{ref!r}: its record has no readable metadata") from None
            if meta.size != ref.size:
                raise IntegrityError(
                    f"{ref!r}: the store holds {meta.size} bytes under this digest, "
                    f"the Ref says {ref.size}"
                )
            if meta.chunks and (
                meta.chunk < 1
                or meta.chunk > self.nc.max_payload
                or meta.chunks != -(-meta.size // meta.chunk)
            ):
                raise IntegrityError(f"{ref!r}: its record describes impossible chunks")
            return scope, record, meta
        where = f"scope {ref.scope!r}" if ref.scope else "the kept values"
        if ref.scope not in (self.scope, ""):
            where += f", another session than {self.scope!r}"
        raise NotFound(
            f"{ref!r} is not in {where} (nor in {self.scope!r}): it was deleted, its "
            "session ended, or it was put on another server"
        )

    async def _parts(
        self, scope: str, hexd: str, record: Msg, meta: _Meta
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(index, chunk) for every stored chunk, each once, checked for shape (index,
        sequence, size), not content. Mostly in order; after a retry, in any order."""
        if not meta.chunks:
            if len(record.data) != meta.size:
                raise IntegrityError(
                    f"value sha256:{hexd[:16]}... is truncated: {len(record.data)} of "
                    f"{meta.size} bytes"
                )
            yield 0, record.data
            return
        prefix = f"{_location(scope)}.{hexd}.d.{meta.upload}."
        api = f"$JS.API.DIRECT.GET.{stream_name(scope)}"
        window = min(MAX_BATCH, max(1, WINDOW_BYTES // meta.chunk))
        inbox = self.nc.new_inbox()
        box: deque[Msg] = deque()
        wake = anyio.Event()

        async def on_msg(msg: Msg) -> None:
            box.append(msg)
            wake.set()

        sub = await self.nc.subscribe(
            f"{inbox}.*", cb=on_msg, pending_msgs_limit=8 * window + 16, pending_bytes_limit=0
        )
        have: set[int] = set()
        got = total = attempt = in_window = 0
        next_seq = meta.first
        ask = True
        moved = time.monotonic()
        try:
            while got < meta.chunks:
                if ask:
                    attempt += 1
                    in_window = 0
                    reconnects = self._reconnects()
                    want = min(window, meta.chunks - got)
                    request = {"seq": next_seq, "next_by_subj": prefix + "*", "batch": want}
                    try:
                        await self.nc.publish(
                            api, json.dumps(request).encode(), reply=f"{inbox}.{attempt}"
                        )
                    except _TRANSIENT:
                        pass  # disconnected with a full buffer: ask again below
                    except nats.errors.Error as e:
                        raise StoreUnavailable(f"the NATS connection is gone: {e}") from e
                    ask = False
                if not box:
                    await self._wait(wake, reconnects)
                    wake = anyio.Event()
                    if not box:
                        if time.monotonic() - moved > self.timeout:
                            raise StoreUnavailable(
                                f"the store sent no chunk of sha256:{hexd[:16]}... within "
                                f"{self.timeout}s ({got} of {meta.chunks} read); the NATS "
                                "server may be restarting: nothing was lost, retry"
                            )
                        ask = True  # a stall (restart, lost reply): ask from where we are
                        continue
                msg = box.popleft()
                current = msg.subject.endswith(f".{attempt}")
                headers = msg.headers or {}
                status = headers.get("Status")
                if status:
                    if not current:
                        continue
                    if status in ("204", "404") and in_window:  # end of this batch
                        ask = True
                    elif status in ("204", "404"):
                        # The record is there, so its chunks were stored before it: on a
                        # cluster a replica behind answered. Ask again until `timeout`.
                        if self.lag and time.monotonic() - moved < self.timeout:
                            await anyio.sleep(0.05)
                            ask = True
                            continue
                        self._log.warning(
                            "store.read_short", value=hexd[:16], got=got, chunks=meta.chunks,
                            next_seq=next_seq, last=meta.last, status=status,
                            server=self.nc.connected_url.netloc if self.nc.connected_url else "",
                        )  # fmt: skip
                        break  # nothing more is stored: truncated, said below
                    elif status in ("408", "503"):  # no stream leader yet, server starting
                        await anyio.sleep(0.2)
                        ask = True
                    else:
                        raise StoreError(f"the store answered a chunk read with status {status}")
                    continue
                seq = int(headers.get("Nats-Sequence", 0))
                subject = headers.get("Nats-Subject", "")
                if seq > meta.last or not subject.startswith(prefix):
                    raise IntegrityError(
                        f"value sha256:{hexd[:16]}... is corrupted: a chunk was replaced "
                        f"(sequence {seq} is after its last chunk {meta.last})"
                    )
                try:
                    i = int(subject[len(prefix) :])
                except ValueError:
                    i = -1
                expect = min(meta.chunk, meta.size - i * meta.chunk)
                if not 0 <= i < meta.chunks or len(msg.data) != expect:
                    raise IntegrityError(
                        f"value sha256:{hexd[:16]}... is corrupted: a chunk of the wrong "
                        f"index or size ({subject[len(prefix) :]!r}, {len(msg.data)} bytes)"
                    )
                next_seq = max(next_seq, seq + 1)
                moved = time.monotonic()
                in_window += current
                if i in have:
                    continue  # asked twice after a retry
                have.add(i)
                got += 1
                total += len(msg.data)
                yield i, msg.data
        finally:
            await unsubscribe([sub])
        if got != meta.chunks or total != meta.size:
            raise IntegrityError(
                f"value sha256:{hexd[:16]}... is truncated: {got} of {meta.chunks} chunks, "
                f"{total} of {meta.size} bytes"
            )

    async def _upload(
        self, scope: str, hexd: str, kind: ValueKind, data: bytes, preview: str
    ) -> None:
        size = len(data)
        if size <= self.chunk_size:
            meta = _Meta(size=size, kind=kind, preview=preview)
            await self._commit(scope, hexd, meta, data)
            return
        upload = uuid.uuid4().hex[:16]
        prefix = f"{_location(scope)}.{hexd}.d.{upload}."
        committing = False
        try:
            digests = bytearray()
            try:
                async with anyio.create_task_group() as tg:
                    if size >= THREAD_HASH_BYTES:  # chunk digests in a thread meanwhile

                        async def hash_chunks() -> None:
                            digests[:] = await anyio.to_thread.run_sync(
                                _chunk_digests, data, self.chunk_size
                            )

                        tg.start_soon(hash_chunks)
                    else:
                        digests[:] = _chunk_digests(data, self.chunk_size)
                    first, last = await self._publish_chunks(prefix, upload, data)
            except BaseExceptionGroup as group:  # one typed error, never a group
                raise _single(group) from None
            meta = _Meta(
                size=size,
                kind=kind,
                chunks=len(digests) // 32,
                chunk=self.chunk_size,
                first=first,
                last=last,
                upload=upload,
                preview=preview,
            )
            committing = True
            if await self._commit(scope, hexd, meta, bytes(digests)) is False:
                await self._orphans(scope, prefix)  # someone else stored it first: theirs stands
        except BaseException:
            if not committing:  # once a record may be written, its chunks are never removed
                await self._orphans(scope, prefix)
            raise

    async def _orphans(self, scope: str, prefix: str) -> None:
        """Chunks no record points to: the runner removes them; a peer may not purge, so
        they wait for the session's drop."""
        if not self.admin:
            self._log.debug("store.orphan_chunks", subject=prefix + "*")
            return
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(self.timeout):
                    await self._purge(scope, prefix + "*")
            except Exception as e:
                self._log.warning("store.orphan_chunks", subject=prefix + "*", error=str(e))

    async def _publish_chunks(self, prefix: str, upload: str, data: bytes) -> tuple[int, int]:
        """Publish every chunk with a reply subject naming its index; acks come back while
        later chunks go out. What is not acknowledged within `RETRY_AFTER` is sent again
        (the stream drops duplicates by message id), until `timeout` without progress."""
        view = memoryview(data)
        chunk = self.chunk_size
        n = -(-len(data) // chunk)
        max_out = max(1, INFLIGHT_BYTES // chunk)
        seqs: dict[int, int] = {}  # index -> stream sequence, once acknowledged
        errors: list[str] = []
        wake = anyio.Event()

        async def on_ack(msg: Msg) -> None:
            try:
                i = int(msg.subject.rsplit(".", 1)[1])
            except ValueError:
                return
            if msg.headers and msg.headers.get("Status"):
                return  # 503: no stream answered (restart, election); sent again later
            try:
                ack = json.loads(msg.data)
            except ValueError:
                errors.append(msg.data[:200].decode(errors="replace"))
            else:
                if "error" in ack:
                    errors.append(str(ack["error"].get("description", ack["error"])))
                elif "seq" in ack:
                    seqs.setdefault(i, int(ack["seq"]))
            wake.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(f"{inbox}.*", cb=on_ack, pending_msgs_limit=2 * max_out + 16)
        sent = 0  # chunks 0 .. sent-1 went out at least once
        reconnects = self._reconnects()
        moved = time.monotonic()
        acked = 0

        async def send(i: int) -> bool:
            piece = view[i * chunk : (i + 1) * chunk]
            try:
                await self.nc.publish(
                    prefix + str(i),
                    piece,
                    reply=f"{inbox}.{i}",
                    headers={"Nats-Msg-Id": f"{upload}.{i}"},
                )
            except _TRANSIENT:
                return False  # disconnected and the buffer is full: later
            except nats.errors.Error as e:
                raise StoreUnavailable(f"the NATS connection is gone: {e}") from e
            return True

        try:
            while len(seqs) < n:
                while sent < n and sent - len(seqs) < max_out and await send(sent):
                    sent += 1
                if errors:
                    raise StoreError(f"the store refused a chunk: {errors[0]}")
                await self._wait(wake, reconnects)
                wake = anyio.Event()
                if errors:
                    raise StoreError(f"the store refused a chunk: {errors[0]}")
                if self._reconnects() != reconnects:  # what was in flight may be lost: again
                    reconnects = self._reconnects()
                    for i in range(sent):
                        if i not in seqs and not await send(i):
                            break
                if len(seqs) > acked:
                    acked, moved = len(seqs), time.monotonic()
                elif time.monotonic() - moved > self.timeout:
                    raise StoreUnavailable(
                        f"the store acknowledged {len(seqs)} of {n} chunks and then nothing "
                        f"for {self.timeout}s; the NATS server may be restarting: retry"
                    )
                elif time.monotonic() - moved > RETRY_AFTER:  # a stall: send the rest again
                    for i in range(sent):
                        if i not in seqs and not await send(i):
                            break
        finally:
            await unsubscribe([sub])
        return min(seqs.values()), max(seqs.values())

    async def _commit(self, scope: str, hexd: str, meta: _Meta, payload: bytes) -> bool | None:
        """Write the record unless one exists. True: this record stands; False: another
        writer's stands (this upload's chunks may go); None: a record stands, whose is not
        known yet (a re-sent commit, read from a replica behind): keep the chunks."""
        subject = f"{_location(scope)}.{hexd}.m"
        headers = {META_HEADER: meta.model_dump_json(), "Nats-Expected-Last-Subject-Sequence": "0"}
        msg, resent = await self._send(subject, payload, headers, what="record a value")
        if msg.headers and msg.headers.get("Status"):
            raise StoreError(f"the store answered a write with status {msg.headers['Status']}")
        if await self._ack(msg) is not None:
            return True
        if not resent:
            return False
        # Refused after a re-send: the first send may have landed (its ack lost).
        end = time.monotonic() + max(self.lag, 1.0)
        while (record := await self._record(scope, hexd)) is None and time.monotonic() < end:
            await anyio.sleep(0.05)
        stored = (record.headers or {}).get(META_HEADER) if record is not None else None
        if stored is None:
            return None
        try:
            return _Meta.model_validate_json(stored).upload == meta.upload
        except ValidationError:
            return None

    async def _purge(self, scope: str, subject_filter: str) -> None:
        try:
            await self.js.purge_stream(stream_name(scope), subject=subject_filter)
        except nats.errors.Error as e:
            raise StoreError(f"could not remove {subject_filter}: {e}") from e


def _chunk(nc: NATS, chunk_size: int | None) -> int:
    limit = nc.max_payload - 4096  # room for the record's headers
    chunk = min(chunk_size or DEFAULT_CHUNK, limit)
    if chunk < 1:
        raise StoreError(f"the server's max_payload ({nc.max_payload}) is too small")
    return chunk


def _too_large(ref: Ref, size: int, limit: float) -> str:
    return (
        f"{ref!r} is {size} bytes, over this reader's limit of {int(limit)}; read it with "
        "`stream()` chunk by chunk, or pass a bigger `limit` if it is expected"
    )


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one error a task group stands for: a store error first, else the first."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(group)
    for e in leaves:
        if isinstance(e, StoreError):
            return e
    first = leaves[0] if leaves else group
    if isinstance(first, Exception) and not isinstance(first, StoreError):
        err = StoreUnavailable(f"a store transfer failed: {first or type(first).__name__}")
        err.__cause__ = first
        return err
    return first


async def _ensure_stream(js: Any, name: str, location: str, replicas: int) -> None:
    """Create a stream (or the stream of a KV bucket when `location` is empty) unless it
    exists; raise the replica count of an existing one if asked for more."""
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        info = None
    if info is not None:
        if info.config.num_replicas < replicas:
            await js.update_stream(config=info.config.evolve(num_replicas=replicas))
        return
    try:
        if location:
            await js.add_stream(
                name=name,
                subjects=[f"{location}.>"],
                storage=StorageType.FILE,
                allow_direct=True,
                num_replicas=replicas,
                description="council shared store: values by content address",
            )
        else:
            await js.create_key_value(
                bucket=name.removeprefix("KV_"),
                history=KV_HISTORY,
                storage=StorageType.FILE,
                direct=True,
                replicas=replicas,
            )
    except nats.js.errors.BadRequestError as e:  # created by another runner meanwhile
        if e.err_code != 10058:  # stream name already in use
            raise
