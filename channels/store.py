"""The shared variable store: values by content address, named variables by compare-and-set.

Peers pass `Ref`s, not values, so a 40 MB document crosses the bus as a few hundred bytes
and is read only by whoever needs it. Everything lives in JetStream (file storage, so it
survives a server restart):

- one stream, `COUNCIL_STORE`, subjects `cstore.>`:
      cstore.s.<scope>.<hex>.m             the value's record (one message; see below)
      cstore.s.<scope>.<hex>.d.<upload>    its chunks, in order, when it does not fit inline
      cstore.k.<hex>...                    the same for kept values (outlive every session)
  A record's `Council-Meta` header holds size, kind and where the chunks are; its payload
  is the value itself when it fits in one chunk, else the sha256 of every chunk.
- one KV bucket, `council-vars`, keys `<scope>.<name>`, for named mutable variables.

Why not nats-py's Object Store: its get reads one message at a time through a consumer and
grows its result by concatenation (measured at ~16 MB/s). Here a write publishes every
chunk back to back and collects the acks as they come (a bounded window, no round trip
per chunk); a read asks for a window of chunks with one batched direct get and receives
them on one subscription, so the transfer is as fast as the socket and the hash.

Integrity: the record is written last and only if none exists (expected last subject
sequence 0), so a half-written or racing upload is never visible. Every read checks
the sha256 of what it returns; `stream` also checks each chunk before yielding it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
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
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, ValidationError

from channels import log, subjects
from channels.errors import (
    IntegrityError,
    InvalidName,
    NotFound,
    StoreError,
    UnsupportedValue,
)
from channels.messages import Ref, ValueKind
from channels.natsio import unsubscribe

_log = log.get("council.store")

STREAM = "COUNCIL_STORE"
PREFIX = "cstore"
KV_BUCKET = "council-vars"
KV_STREAM = f"KV_{KV_BUCKET}"  # the stream JetStream keeps a KV bucket in
META_HEADER = "Council-Meta"

DEFAULT_CHUNK = 512 * 1024  # measured: 256 KiB is ~40% slower to write, 1 MiB no faster
WINDOW_BYTES = 16 * 1024 * 1024  # chunks asked for in one direct get; bounds read buffering
MAX_BATCH = 1024  # chunks per direct get, whatever their size
INFLIGHT_BYTES = 32 * 1024 * 1024  # unacknowledged chunk bytes a writer may have out
THREAD_HASH_BYTES = 8 * 1024 * 1024  # hash bigger values off the event loop
KV_INLINE_BYTES = 64 * 1024  # a bound value bigger than this goes to the store as a Ref
PREVIEW_CHARS = 100
DEFAULT_TIMEOUT = 30.0

_NAME = re.compile(r"[A-Za-z0-9_\-/=]+(\.[A-Za-z0-9_\-/=]+)*")
_WRONG_LAST_SEQUENCE = (10071, 10164)


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


def _place(view: memoryview, off: int, part: bytes, ref: Ref) -> int:
    end = off + len(part)
    if end > len(view):
        raise IntegrityError(f"{ref!r} is corrupted: its chunks hold more than {ref.size} bytes")
    view[off:end] = part
    return end


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
    """One scope's view of the shared store, on a caller's NATS connection.

    `scope` is usually the session id: what is put here is removed by `drop()` when the
    session ends, unless it was put with `keep=True`. Refs from any scope can be read.
    """

    def __init__(
        self,
        nc: NATS,
        kv: KeyValue,
        *,
        scope: str,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=timeout)
        self.kv = kv
        self.scope = subjects.check_name(scope, "scope")
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._log = _log.bind(scope=scope)

    @classmethod
    async def open(
        cls,
        nc: NATS,
        *,
        scope: str,
        chunk_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Store:
        """Create the stream and KV bucket if missing (idempotent, safe from many peers)."""
        subjects.check_name(scope, "scope")
        limit = nc.max_payload - 4096  # room for the record's headers
        chunk = min(chunk_size or DEFAULT_CHUNK, limit)
        if chunk < 1:
            raise StoreError(f"the server's max_payload ({nc.max_payload}) is too small")
        js = nc.jetstream(timeout=timeout)
        try:
            await _ensure_stream(js)
            kv = await _ensure_kv(js)
        except nats.errors.Error as e:
            raise StoreError(
                f"cannot open the store on this NATS server: {e or type(e).__name__}; "
                "the server needs JetStream enabled (`council run` starts one that has it)"
            ) from e
        return cls(nc, kv, scope=scope, chunk_size=chunk, timeout=timeout)

    # -- values ----------------------------------------------------------------------------

    async def put(self, value: Any, *, keep: bool = False) -> Ref:
        """Store a value once (by content) and return its Ref; `keep` outlives the session."""
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

    async def get(self, ref: Ref) -> Any:
        """The value, decoded per `ref.kind`; raises `NotFound` or `IntegrityError`."""
        data = await self._read(ref)
        if ref.kind == "bytes" and not isinstance(data, bytes):
            data = bytes(data)
        return decode_value(ref.kind, data)  # text and JSON decode straight from the buffer

    async def read_bytes(self, ref: Ref) -> bytes:
        data = await self._read(ref)
        return data if isinstance(data, bytes) else bytes(data)

    async def _read(self, ref: Ref) -> bytes | bytearray:
        """The value's checked bytes: chunks are copied into one preallocated buffer as they
        arrive (so their memory is reused for the next ones), and hashed as they land --
        in a thread, window by window, for a big value."""
        scope, record, meta = await self._locate(ref)
        hasher = hashlib.sha256()
        if not meta.chunks:
            async for part in self._chunks(scope, ref.hex, record, meta):
                data: bytes | bytearray = part
            hasher.update(data)
        else:
            data = bytearray(meta.size)
            view = memoryview(data)
            off = 0
            if meta.size < THREAD_HASH_BYTES:
                async for part in self._chunks(scope, ref.hex, record, meta):
                    off = _place(view, off, part, ref)
                hasher.update(view)
            else:
                send, receive = anyio.create_memory_object_stream[memoryview](max_buffer_size=inf)

                async def hash_windows() -> None:
                    async with receive:
                        async for window in receive:
                            await anyio.to_thread.run_sync(hasher.update, window)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(hash_windows)
                    async with send:
                        hashed = 0
                        async for part in self._chunks(scope, ref.hex, record, meta):
                            off = _place(view, off, part, ref)
                            if off - hashed >= WINDOW_BYTES:
                                send.send_nowait(view[hashed:off])
                                hashed = off
                        send.send_nowait(view[hashed:off])
            view.release()
        hexd = hasher.hexdigest()
        if hexd != ref.hex:
            raise IntegrityError(
                f"{ref!r} is corrupted: its bytes hash to sha256:{hexd[:16]}...; "
                "the stored value cannot be trusted, put it again from its source"
            )
        return data

    async def stream(self, ref: Ref) -> AsyncIterator[bytes]:
        """The value's bytes chunk by chunk, each checked before it is yielded.

        Memory stays at about one read window whatever the size. The whole-value digest is
        checked at the end too (a record rewritten with matching fake chunks fails there).
        """
        scope, record, meta = await self._locate(ref)
        digests = record.data if meta.chunks else b""
        if meta.chunks and len(digests) != 32 * meta.chunks:
            raise IntegrityError(f"{ref!r}: its record lists the wrong number of chunk digests")
        hasher = hashlib.sha256()
        i = 0
        async for part in self._chunks(scope, ref.hex, record, meta):
            if meta.chunks:
                if hashlib.sha256(part).digest() != digests[32 * i : 32 * i + 32]:
                    raise IntegrityError(f"{ref!r}: chunk {i} is corrupted")
                hasher.update(part)
            elif _sha256_hex(part) != ref.hex:
                raise IntegrityError(f"{ref!r} is corrupted")
            else:
                hasher.update(part)
            i += 1
            yield part
        if hasher.hexdigest() != ref.hex:
            raise IntegrityError(f"{ref!r} is corrupted (whole-value digest differs)")

    async def exists(self, ref: Ref) -> bool:
        try:
            await self._locate(ref)
        except NotFound:
            return False
        return True

    async def delete(self, ref: Ref) -> None:
        """Remove the value from the scope the Ref names (a no-op if it is not there)."""
        await self._purge(f"{_location(ref.scope)}.{ref.hex}.>")

    async def drop(self) -> None:
        """Remove everything this scope put (values and named variables), except kept values."""
        await self._purge(f"{_location(self.scope)}.>")
        try:
            await self.js.purge_stream(KV_STREAM, subject=f"$KV.{KV_BUCKET}.{self.scope}.>")
        except nats.errors.Error as e:
            raise StoreError(f"could not drop the variables of scope {self.scope!r}: {e}") from e
        self._log.info("store.dropped")

    # -- named variables -------------------------------------------------------------------

    async def bind(self, name: str, value: Any) -> int:
        """Set `name` (in this scope) to a value or Ref; returns the new revision."""
        data = await self._var_encode(value)
        try:
            return await self.kv.put(self._key(name), data)
        except nats.errors.Error as e:
            raise StoreError(f"could not bind {name!r}: {e}") from e

    async def lookup(self, name: str, default: Any = MISSING) -> Any:
        entry = await self._var_entry(name)
        if entry is None:
            if default is MISSING:
                raise NotFound(
                    f"no variable {name!r} in scope {self.scope!r}; bind it first, or pass "
                    "a default to lookup()"
                )
            return default
        return await self._var_decode(entry.value)

    async def update(
        self, name: str, fn: Callable[[Any], Any | Awaitable[Any]], *, default: Any = None
    ) -> Any:
        """Compare-and-set loop: `fn(old)` (old is `default` when unbound) becomes the value
        only if nobody changed it meanwhile, else `fn` runs again on the newer value. Keep
        `fn` free of side effects for that reason. Returns the value written."""
        key = self._key(name)
        attempt = 0
        while True:
            entry = await self._var_entry(name)
            old = default if entry is None else await self._var_decode(entry.value)
            new = fn(old)
            if isawaitable(new):
                new = await new
            data = await self._var_encode(new)
            try:
                if entry is None:
                    await self.kv.create(key, data)
                else:
                    await self.kv.update(key, data, last=entry.revision)
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                attempt += 1
                # back off a little so many writers converge instead of all retrying at once
                await anyio.sleep(random.random() * min(0.0005 * attempt, 0.02))
            except nats.errors.Error as e:
                raise StoreError(f"could not update {name!r}: {e}") from e

    def _key(self, name: str) -> str:
        return f"{self.scope}.{_check_var(name)}"

    async def _var_entry(self, name: str) -> Any:
        try:
            return await self.kv.get(self._key(name))
        except nats.js.errors.KeyNotFoundError:  # also a deleted key
            return None
        except nats.errors.Error as e:
            raise StoreError(f"could not read {name!r}: {e}") from e

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
        except ValueError as e:
            raise IntegrityError(f"a named variable holds unreadable data: {e}") from None
        if "r" in envelope:  # put in the store by bind(): give back the value
            return await self.get(Ref.model_validate(envelope["r"]))
        return envelope["v"]

    # -- records and chunks ----------------------------------------------------------------

    async def _record(self, scope: str, hexd: str) -> Msg | None:
        """The record message of a value in one scope, or None."""
        subject = f"$JS.API.DIRECT.GET.{STREAM}.{_location(scope)}.{hexd}.m"
        try:
            msg = await self.nc.request(subject, b"", timeout=self.timeout)
        except nats.errors.NoRespondersError:
            raise StoreError(
                f"stream {STREAM} does not answer direct gets; was it created by another "
                "tool? delete it and let Store.open create it"
            ) from None
        except nats.errors.TimeoutError:
            raise StoreError(f"the store did not answer within {self.timeout}s") from None
        status = msg.headers.get("Status") if msg.headers else None
        if status == "404":
            return None
        if status:
            raise StoreError(f"the store answered a read with status {status}: {msg.headers}")
        return msg

    async def _locate(self, ref: Ref) -> tuple[str, Msg, _Meta]:
        for scope in dict.fromkeys((ref.scope, self.scope, "")):
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
            return scope, record, meta
        where = f"scope {ref.scope!r}" if ref.scope else "the kept values"
        raise NotFound(
            f"{ref!r} is not in {where} (nor in {self.scope!r}): it was deleted, its "
            "session ended, or it was put on another server"
        )

    async def _chunks(
        self, scope: str, hexd: str, record: Msg, meta: _Meta
    ) -> AsyncIterator[bytes]:
        """The stored parts in order, checked for shape (count, order, size), not content."""
        if not meta.chunks:
            if len(record.data) != meta.size:
                raise IntegrityError(
                    f"value sha256:{hexd[:16]}... is truncated: {len(record.data)} of "
                    f"{meta.size} bytes"
                )
            yield record.data
            return
        subject = f"{_location(scope)}.{hexd}.d.{meta.upload}"
        api = f"$JS.API.DIRECT.GET.{STREAM}"
        window = min(MAX_BATCH, max(1, WINDOW_BYTES // max(1, meta.size // meta.chunks)))
        inbox = self.nc.new_inbox()
        box: deque[Msg] = deque()
        wake = anyio.Event()

        async def on_msg(msg: Msg) -> None:
            box.append(msg)
            wake.set()

        sub = await self.nc.subscribe(
            inbox, cb=on_msg, pending_msgs_limit=4 * window + 16, pending_bytes_limit=0
        )
        got = total = 0
        next_seq = meta.first
        try:
            while got < meta.chunks:
                want = min(window, meta.chunks - got)
                request = {"seq": next_seq, "next_by_subj": subject, "batch": want}
                await self.nc.publish(api, json.dumps(request).encode(), reply=inbox)
                in_window = 0
                while True:
                    if not box:
                        with anyio.move_on_after(self.timeout):
                            await wake.wait()
                        if not box:
                            raise StoreError(
                                f"the store sent no chunk of sha256:{hexd[:16]}... "
                                f"within {self.timeout}s"
                            )
                        wake = anyio.Event()
                    msg = box.popleft()
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status in ("204", "404"):  # end of this batch / nothing (more) there
                        break
                    if status:
                        raise StoreError(f"the store answered a chunk read with status {status}")
                    seq = int(headers.get("Nats-Sequence", 0))
                    if seq > meta.last or got >= meta.chunks:
                        raise IntegrityError(
                            f"value sha256:{hexd[:16]}... is corrupted: a chunk was replaced "
                            f"(sequence {seq} is after its last chunk {meta.last})"
                        )
                    next_seq = seq + 1
                    got += 1
                    in_window += 1
                    total += len(msg.data)
                    yield msg.data
                if in_window == 0:
                    break
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
        subject = f"{_location(scope)}.{hexd}.d.{upload}"
        try:
            digests = bytearray()
            async with anyio.create_task_group() as tg:
                if size >= THREAD_HASH_BYTES:  # chunk digests in a thread while chunks go out

                    async def hash_chunks() -> None:
                        digests[:] = await anyio.to_thread.run_sync(
                            _chunk_digests, data, self.chunk_size
                        )

                    tg.start_soon(hash_chunks)
                else:
                    digests[:] = _chunk_digests(data, self.chunk_size)
                first, last = await self._publish_chunks(subject, data)
            meta = _Meta(
                size=size,
                kind=kind,
                chunks=len(digests) // 32,
                first=first,
                last=last,
                upload=upload,
                preview=preview,
            )
            if not await self._commit(scope, hexd, meta, bytes(digests)):
                await self._purge(subject)  # someone else stored it first: theirs stands
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await self._purge(subject)
                except Exception as e:
                    self._log.warning("store.orphan_chunks", subject=subject, error=str(e))
            raise

    async def _publish_chunks(self, subject: str, data: bytes) -> tuple[int, int]:
        """Publish every chunk with a reply inbox; acks come back while later chunks go out."""
        view = memoryview(data)
        chunk = self.chunk_size
        n = -(-len(data) // chunk)
        max_out = max(1, INFLIGHT_BYTES // chunk)
        acked = 0
        first = last = 0
        errors: list[str] = []
        wake = anyio.Event()

        async def on_ack(msg: Msg) -> None:
            nonlocal acked, first, last
            acked += 1
            try:
                ack = json.loads(msg.data)
                seq = int(ack["seq"])
            except (ValueError, KeyError, TypeError):
                errors.append(msg.data[:200].decode(errors="replace"))
            else:
                first = seq if not first else min(first, seq)
                last = max(last, seq)
            wake.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_ack, pending_msgs_limit=max_out + 16)

        async def until(cond: Callable[[], bool]) -> None:
            nonlocal wake
            while not cond():
                with anyio.move_on_after(self.timeout) as scope:
                    await wake.wait()
                if scope.cancelled_caught and not cond():
                    raise StoreError(f"the store did not acknowledge chunks within {self.timeout}s")
                wake = anyio.Event()

        try:
            for i in range(n):
                piece = view[i * chunk : (i + 1) * chunk]
                if i - acked >= max_out:
                    await until(lambda i=i: i - acked < max_out or bool(errors))
                if errors:
                    break
                await self.nc.publish(subject, piece, reply=inbox)
            await until(lambda: acked >= n or bool(errors))
        finally:
            await unsubscribe([sub])
        if errors:
            raise StoreError(f"the store refused a chunk: {errors[0]}")
        return first, last

    async def _commit(self, scope: str, hexd: str, meta: _Meta, payload: bytes) -> bool:
        """Write the record unless one exists; False when another writer got there first."""
        subject = f"{_location(scope)}.{hexd}.m"
        headers = {META_HEADER: meta.model_dump_json(), "Nats-Expected-Last-Subject-Sequence": "0"}
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise StoreError(
                f"no stream takes {subject}; open the store with Store.open first"
            ) from None
        except nats.errors.TimeoutError:
            raise StoreError(
                f"the store did not acknowledge a write within {self.timeout}s"
            ) from None
        ack = json.loads(msg.data)
        error = ack.get("error")
        if error is None:
            return True
        if error.get("err_code") in _WRONG_LAST_SEQUENCE:
            return False
        raise StoreError(f"the store refused to record a value: {error.get('description', error)}")

    async def _purge(self, subject_filter: str) -> None:
        try:
            await self.js.purge_stream(STREAM, subject=subject_filter)
        except nats.errors.Error as e:
            raise StoreError(f"could not remove {subject_filter}: {e}") from e


def _location(scope: str) -> str:
    return f"{PREFIX}.s.{scope}" if scope else f"{PREFIX}.k"


async def _ensure_stream(js: Any) -> None:
    try:
        await js.stream_info(STREAM)
        return
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(
            name=STREAM,
            subjects=[f"{PREFIX}.>"],
            storage=StorageType.FILE,
            allow_direct=True,
            description="council shared store: values by content address",
        )
    except nats.js.errors.BadRequestError as e:  # created by a peer meanwhile
        if e.err_code != 10058:  # stream name already in use
            raise


async def _ensure_kv(js: Any) -> KeyValue:
    try:
        return await js.key_value(KV_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            bucket=KV_BUCKET, history=1, storage=StorageType.FILE, direct=True
        )
    except nats.js.errors.BadRequestError:
        return await js.key_value(KV_BUCKET)
