"""The recorder: every message of a session, in the order the bus delivered it, to a cassette.

It listens, it never takes part: two wildcard subscriptions (the session's subjects and
its peers' reply inboxes) whose callbacks only stamp and queue the raw bytes, so a
session runs as fast recorded as not. A writer thread turns them into cassette lines and
hands them to the OS whenever it has caught up with the bus (and fsyncs once a
`SYNC_INTERVAL` while there is news), so a runner killed mid-run loses at most the
messages still queued: the calls in flight. The end record (count + digest) is written at `stop()`, so a cassette
that lacks it is known to be cut short; `Recorder(..., resume=cassette)` carries on
writing such a cassette where it stopped (council/session.py's resume).

Credentials never reach the file: the declaration in the header and every message are
masked with channels/redact.py before they are written (and a replay masks the live
requests the same way, so they still match).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel

from channels import log, redact, subjects
from channels.messages import Failure, Ref, Reply
from channels.natsio import drain, settle
from council.cassette import (
    DEFAULT_INLINE_LIMIT,
    Cassette,
    Entry,
    Footer,
    Header,
    blob_name,
    blobs_dir_name,
    sha256,
)

_log = log.get("council.record")

_ANSWER_PREFIXES = (b'{"type":"reply"', b'{"type":"failure"')
_VERB_KIND = {"call": "call", "cancel": "cancel", "event": "event"}
_MESSAGE_TYPES = {
    "call": {"call"},
    "cancel": {"cancel"},
    "event": {"step", "completion", "execution", "log"},
    "answer": {"reply", "failure"},
}
_ANSWER_KEYS = {
    "reply": set(Reply.model_fields),
    "failure": set(Failure.model_fields),
}
DEFAULT_SAVE_REFS_LIMIT = 256 * 1024 * 1024
SYNC_INTERVAL = 1.0  # seconds between fsyncs while recording (a machine that dies loses less)
BATCH = 0.005  # seconds a busy writer holds lines before handing them to the OS
Flush = Literal["batch", "line", "end"]


class RefReader(Protocol):
    async def read_bytes(self, ref: Ref) -> bytes: ...


@dataclass(frozen=True)
class RecordSummary:
    path: Path
    entries: int
    calls: int
    dropped: int
    refs_saved: int
    missing_refs: int
    bytes: int


def council_json(council: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The declaration as JSON and its digest (sha256 of canonical JSON), for the header."""
    if council is None:
        return None, None
    if isinstance(council, BaseModel):
        data = council.model_dump(mode="json")
    elif hasattr(council, "to_json") and callable(council.to_json):
        data = council.to_json()
        data = json.loads(data) if isinstance(data, str | bytes) else data
    else:
        data = dict(council)
    own = getattr(council, "digest", None)  # a Council's digest is over the same canonical JSON
    if isinstance(own, str):
        return data, own
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return data, sha256(canonical)


def answered_by_models_or_humans(council: Any) -> tuple[list[str], dict[str, str]]:
    """From a declaration: the peers a replay answers from the cassette (LLM peers, each
    agent's model peer, humans) and the model each model peer ran, for the header."""
    replay: list[str] = []
    models: dict[str, str] = {}
    for peer in getattr(council, "peers", []):
        kind = getattr(peer, "kind", "")
        if kind == "human":
            replay.append(peer.name)
        elif kind in ("llm", "agent"):
            name = peer.name if kind == "llm" else peer.model_peer
            replay.append(name)
            try:
                models[name] = council.model_of(peer)
            except Exception:  # no model named: the caller passes one in at run time
                models[name] = "?"
    return replay, models


class Recorder:
    """Records session `session` seen on `nc` into `path`.

    Use `async with Recorder(nc, session, path) as rec:`; it is listening when the block
    starts (the server has its subscriptions) and the cassette is complete and synced when
    it ends. The contents of Refs seen in messages (spilled replies, values peers passed by
    reference) are saved beside the cassette, so a replay can serve them after the session's
    store is gone: read through `store` (anything with `read_bytes(ref)`), by default the
    session's Store on `nc`; `None` saves none. Stop the recorder before the session's
    store is dropped.
    """

    def __init__(
        self,
        nc: NATS,
        session: str,
        path: str | Path,
        *,
        council: Any = None,
        council_digest: str | None = None,
        models: dict[str, str] | None = None,
        replay: list[str] | None = None,
        meta: dict[str, Any] | None = None,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        store: RefReader | Literal["auto"] | None = "auto",
        save_refs_limit: int = DEFAULT_SAVE_REFS_LIMIT,
        blobs: str | None = None,
        resume: Cassette | None = None,
        flush: Flush = "batch",
    ):
        """`resume`: a cassette (loaded leniently) this recorder carries on: its damaged tail
        is cut off, a mark entry says a resumed run starts here, and new entries follow.
        `flush`: when lines go to the OS; "batch" (whenever the writer has caught up with the
        bus) loses at most the calls in flight to a killed runner; "line" and "end" are there
        for benchmarks/replay.py to compare with."""
        self.nc = nc
        self.session = subjects.check_name(session, "session")
        self.path = Path(path)
        self.resume = resume
        self.flush = flush
        council_data, digest = council_json(council)
        if council is not None and (replay is None or models is None):
            derived_replay, derived_models = answered_by_models_or_humans(council)
            replay = derived_replay if replay is None else replay
            models = derived_models if models is None else models
        self.header = (
            resume.header
            if resume is not None
            else Header(
                session=session,
                started=time.time(),
                council=redact.value(council_data),
                council_digest=council_digest or digest,
                models=models or {},
                replay=replay or [],
                meta=redact.value(meta or {}),
                inline_limit=inline_limit,
                blobs=blobs or blobs_dir_name(self.path),
            )
        )
        self.store = store
        self.save_refs_limit = save_refs_limit
        self._queue: queue.SimpleQueue[tuple[str, bytes, float] | None] = queue.SimpleQueue()
        self._subs: list[Any] = []
        self._thread: threading.Thread | None = None
        self._writer: _Writer | None = None
        self._stopped = False
        self.summary: RecordSummary | None = None

    @property
    def blobs_dir(self) -> Path:
        return self.path.parent / self.header.blobs

    async def __aenter__(self) -> Recorder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.stop()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _Writer(
            self.path, self.header, self._queue, resume=self.resume, flush=self.flush
        )
        if self.resume is not None:
            self._writer.mark(session=self.session, after=self.resume._tail[1])
        self._thread = threading.Thread(
            target=self._writer.run, name=f"council-recorder-{self.session}", daemon=True
        )
        self._thread.start()
        put = self._queue.put

        async def on_session(msg: Msg) -> None:
            put((msg.subject, msg.data, time.time()))

        async def on_inbox(msg: Msg) -> None:
            # Reply inboxes also carry JetStream API answers and object-store chunks: keep
            # only council answers, judged by the first bytes (encode() puts `type` first).
            data = msg.data
            if data.startswith(_ANSWER_PREFIXES):
                put((msg.subject, data, time.time()))

        limits = {"pending_msgs_limit": 10_000_000, "pending_bytes_limit": 4 << 30}
        self._subs = [
            await self.nc.subscribe(
                subjects.session_wildcard(self.session), cb=on_session, **limits
            ),
            await self.nc.subscribe(f"_INBOX.{self.session}.>", cb=on_inbox, **limits),
        ]
        await settle(self.nc)
        _log.info("recorder.started", session=self.session, path=str(self.path))

    async def stop(self) -> RecordSummary:
        """Take in what is still in flight, save Ref contents, write the end record, fsync."""
        if self.summary is not None:
            return self.summary
        assert self._writer is not None and self._thread is not None, "recorder never started"
        await drain(self._subs)  # a dead connection keeps what arrived
        self._queue.put(None)
        await anyio.to_thread.run_sync(self._thread.join)
        saved, missing = await self._save_refs(self._writer.refs)
        footer = Footer(
            entries=self._writer.count,
            ended=time.time(),
            digest="sha256:" + self._writer.digest.hexdigest(),
            dropped=self._writer.dropped,
            refs=saved,
            missing_refs=missing,
        )
        size = await anyio.to_thread.run_sync(self._writer.finish, footer)
        self.summary = RecordSummary(
            path=self.path,
            entries=self._writer.count,
            calls=self._writer.calls,
            dropped=self._writer.dropped,
            refs_saved=len(saved),
            missing_refs=len(missing),
            bytes=size,
        )
        _log.info("recorder.stopped", **{k: str(v) for k, v in vars(self.summary).items()})
        return self.summary

    async def _save_refs(self, refs: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
        if not refs:
            return [], []
        store = self.store
        if store == "auto":
            try:
                from channels.store import Store

                store = await Store.open(self.nc, scope=self.session)
            except Exception as e:
                _log.warning("recorder.no_store", error=str(e))
                store = None
        if store is None:
            return [], sorted(refs)
        saved: list[str] = []
        missing: list[str] = []
        budget = self.save_refs_limit
        for digest, raw in refs.items():
            target = self.blobs_dir / blob_name(digest)
            if target.is_file():
                saved.append(digest)
                continue
            try:
                ref = Ref.model_validate(raw)
                if ref.size > budget:
                    raise ValueError(f"over the save_refs_limit ({self.save_refs_limit} bytes)")
                data = await store.read_bytes(ref)
            except Exception as e:
                _log.warning("recorder.ref_not_saved", ref=digest, error=str(e))
                missing.append(digest)
                continue
            budget -= len(data)
            data = _masked(ref.kind, data)
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            await anyio.to_thread.run_sync(target.write_bytes, data)
            saved.append(digest)
        return saved, missing


class _Writer:
    """Runs in a thread: raw bus messages in, cassette lines out."""

    def __init__(
        self,
        path: Path,
        header: Header,
        q: queue.SimpleQueue,
        *,
        resume: Cassette | None = None,
        flush: Flush = "batch",
    ):
        self.path = path
        self.header = header
        self.queue = q
        self.flush = flush
        self.count = 0
        self.calls = 0
        self.dropped = 0
        self.flushes = 0
        self.digest = hashlib.sha256()
        self.refs: dict[str, dict[str, Any]] = {}
        self._synced = self._flushed = time.monotonic()
        self._unsynced = False
        if resume is None:
            self.file = open(path, "wb", buffering=1 << 20)
            self.file.write(header.model_dump_json().encode() + b"\n")
        else:
            # Carry on after the last whole entry: a line cut off mid-record and an old end
            # record go, the digest goes on over the lines that stay.
            offset, self.count, digest = resume._tail
            self.digest = digest.copy()
            self.file = open(path, "r+b", buffering=1 << 20)
            self.file.truncate(offset)
            self.file.seek(offset)
        self._flush()

    def mark(self, **info: Any) -> None:
        """A mark entry: where a resumed run starts writing."""
        entry = Entry(kind="mark", seq=self.count, t=time.time(), msg=info)
        self._line(entry.model_dump_json(exclude_none=True).encode())
        self._flush(sync=True)

    def _line(self, line: bytes) -> None:
        self.file.write(line + b"\n")
        self.digest.update(line + b"\n")
        self.count += 1

    def _flush(self, sync: bool = False) -> None:
        self.flushes += 1
        self.file.flush()
        now = self._flushed = time.monotonic()
        self._unsynced = True
        if sync or now - self._synced >= SYNC_INTERVAL:
            os.fsync(self.file.fileno())
            self._synced, self._unsynced = now, False

    @property
    def blobs_dir(self) -> Path:
        return self.path.parent / self.header.blobs

    def run(self) -> None:
        empty = self.queue.empty
        while True:
            try:
                item = self.queue.get(timeout=SYNC_INTERVAL)
            except queue.Empty:  # idle: make what was written survive the machine too
                if self._unsynced:
                    self._flush(sync=True)
                continue
            if item is None:
                break
            try:
                self._write(*item)
            except Exception as e:  # one bad message must not end the recording
                self.dropped += 1
                _log.warning("recorder.entry_failed", error=repr(e))
            if self.flush == "line" or (
                self.flush == "batch" and (empty() or time.monotonic() - self._flushed > BATCH)
            ):
                self._flush()

    def _write(self, subject: str, data: bytes, t: float) -> None:
        if subject.startswith("_INBOX."):
            kind, group = None, "answer"
        else:
            verb = subject.split(".", 3)[2] if subject.count(".") >= 3 else ""
            kind = _VERB_KIND.get(verb)
            group = verb
        if group not in _MESSAGE_TYPES:
            self.dropped += 1
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self.dropped += 1  # garbage on a council subject: the peer refused it too
            return
        mtype = obj.get("type") if isinstance(obj, dict) else None
        if group == "answer":
            if mtype not in _MESSAGE_TYPES[group] or obj.keys() != _ANSWER_KEYS[mtype]:
                # Inboxes also carry store chunks and liveness signals: keep real answers
                # only (an encoded Reply/Failure always has exactly its fields).
                self.dropped += 1
                return
        elif not isinstance(mtype, str):
            self.dropped += 1
            return
        if kind == "call" and mtype == "batch":
            # One entry per call, as if each had come alone: the cassette, its replay and
            # its trace never see how the calls travelled.
            calls = _batched_calls(obj)
            if calls is None:
                self.dropped += 1  # a malformed batch: the callee refused it too
                return
            for call in calls:
                self._entry("call", subject, call, _compact(call), t)
            return
        # A type this version does not know, on a council subject, is kept: a reader shows it
        # as unknown (a newer peer's message), never fails on it.
        self._entry(kind or mtype, subject, obj, data, t)

    def _entry(self, kind: str, subject: str, obj: Any, data: bytes, t: float) -> None:
        """Write one message: `obj` parsed from `data`, its bytes as received."""
        if kind == "call":
            self.calls += 1
        if b'"$ref"' in data:
            _collect_refs(obj, self.refs)
        if redact.maybe_secret(data):
            masked = redact.value(obj)
            if masked is not obj:
                obj, data = masked, b""
        if not data or b"\n" in data:  # one record a line (a hand-made sender pretty-prints)
            data = _compact(obj)
        head = b'{"kind":"%s","seq":%d,"t":%r,"subject":%s,' % (
            kind.encode(),
            self.count,
            t,
            json.dumps(subject).encode(),
        )
        if len(data) > self.header.inline_limit:
            digest = sha256(data)
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            target = self.blobs_dir / blob_name(digest)
            if not target.exists():
                target.write_bytes(data)
            line = head + b'"blob":{"digest":"%s","size":%d}}' % (digest.encode(), len(data))
        else:
            line = head + b'"msg":' + data + b"}"
        self._line(line)

    def finish(self, footer: Footer) -> int:
        self.file.write(footer.model_dump_json().encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        size = self.file.tell()
        self.file.close()
        return size


def _masked(kind: str, data: bytes) -> bytes:
    """A saved value with credentials masked (text and JSON; bytes are kept as they are). The
    file keeps the Ref's name: a replay serves the masked value under it."""
    if kind == "bytes" or not redact.maybe_secret(data):
        return data
    if kind == "json":
        return redact.json_bytes(data)
    return redact.text(data.decode("utf-8", "replace")).encode()


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _batched_calls(obj: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The calls of a batch message as received (None if it is not shaped as one)."""
    items = obj.get("calls")
    if not isinstance(items, list) or not items:
        return None
    calls = [item.get("call") if isinstance(item, dict) else None for item in items]
    if not all(isinstance(c, dict) and c.get("type") == "call" for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _collect_refs(obj: Any, out: dict[str, dict[str, Any]]) -> None:
    if isinstance(obj, dict):
        if isinstance(obj.get("$ref"), str):
            out.setdefault(obj["$ref"], obj)
            return
        for v in obj.values():
            _collect_refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _collect_refs(v, out)
