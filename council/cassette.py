"""The cassette: one recorded session as JSON lines, and the checks that make it trustworthy.

Layout, one JSON object a line:

    {"kind": "header", "format": "council-cassette", "version": 1, ...}   first line
    {"kind": "call" | "reply" | "failure" | "cancel" | "event", "seq": 0, "t": ..., "msg": {...}}
    ...
    {"kind": "end", "entries": N, "digest": "sha256:...", ...}          last line

The end record carries the count and a digest of every entry line, so a cassette cut
short (a crashed recorder, a partial copy) or edited by hand is refused up front for a
replay, with what to do about it, instead of replaying half a session into confusing
mismatches. Traces and resumes read one leniently (`lenient=True`): what cannot be used
(a garbage line, a cut-off last line, a message type this version does not know) is kept
aside in `damaged` / `unusable()` and the rest is read. A resumed run appends to the
cassette after a `{"kind": "mark", ...}` entry, so one cassette may hold several runs
(`segments`); the end record then covers them all.
A message bigger than the header's `inline_limit` lives in the blobs folder beside the
cassette (named by its sha256), and so do the contents of Refs the recorder could read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from channels.errors import CouncilError, MalformedMessage
from channels.messages import SCHEMA_VERSION, Call, Cancel, Failure, Message, Reply, decode

FORMAT = "council-cassette"
FORMAT_VERSION = 1
DEFAULT_INLINE_LIMIT = 64 * 1024

EntryKind = Literal["call", "reply", "failure", "cancel", "event", "mark"]
ENTRY_KINDS: tuple[str, ...] = EntryKind.__args__  # type: ignore[attr-defined]
# Every message type this version can decode; a cassette may hold others (written by a newer
# framework, or a peer speaking a newer protocol): those are shown as unknown, never fatal.
KNOWN_TYPES = frozenset(m.model_fields["type"].default for m in get_args(get_args(Message)[0]))


class CassetteError(CouncilError, ValueError):
    """A cassette that cannot be used as it is; the message says why and how to fix it."""


class CassetteTruncated(CassetteError):
    pass


class CassetteCorrupt(CassetteError):
    pass


class CassetteVersionError(CassetteError):
    pass


def rerecord_hint(path: Path | str) -> str:
    return (
        f"re-record it (pytest --council-record=all, or run the session again with recording "
        f"on into {path})"
    )


def framework_version() -> str:
    try:
        from importlib.metadata import version

        return version("rlm-council")
    except Exception:
        return "unknown"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Header(_Strict):
    kind: Literal["header"] = "header"
    format: Literal["council-cassette"] = FORMAT
    version: int = FORMAT_VERSION
    framework: str = Field(default_factory=framework_version)
    messages: int = SCHEMA_VERSION  # the bus's message schema the entries are written in
    session: str
    started: float
    council: dict[str, Any] | None = None
    council_digest: str | None = None
    models: dict[str, str] = Field(default_factory=dict)
    replay: list[str] = Field(default_factory=list)  # peers a replay answers from the cassette
    inline_limit: int = DEFAULT_INLINE_LIMIT
    blobs: str = ""  # folder beside the cassette, relative name
    meta: dict[str, Any] = Field(default_factory=dict)


class Blob(_Strict):
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Entry(_Strict):
    """One message as the bus delivered it; or, kind "mark", where a resumed run took over
    (its `msg` says from which session and when)."""

    kind: EntryKind
    seq: int = Field(ge=0)
    t: float
    subject: str = ""
    msg: dict[str, Any] | None = None  # the message as sent, unless it is in a blob
    blob: Blob | None = None


@dataclass(frozen=True)
class Damage:
    """A line of a cassette that could not be used, and why (shown by `council trace`)."""

    line: int  # 1-based line number in the file; for an entry, its seq is in `problem`
    problem: str
    preview: str = ""

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}" + (f"  {self.preview}" if self.preview else "")


def _show(line: bytes, n: int = 80) -> str:
    text = line.decode("utf-8", "replace")
    return repr(text if len(text) <= n else text[:n] + "...")


class Footer(_Strict):
    kind: Literal["end"] = "end"
    entries: int = Field(ge=0)
    ended: float
    digest: str
    dropped: int = 0  # bus traffic seen but not recordable (not a council message)
    refs: list[str] = Field(default_factory=list)  # Ref digests whose contents are in blobs
    missing_refs: list[str] = Field(default_factory=list)


def blob_name(digest: str) -> str:
    return digest.removeprefix("sha256:")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Interaction:
    """One call and how it ended, paired by call id."""

    call: Call
    t: float
    seq: int
    answer: Reply | Failure | None = None
    t_answer: float | None = None
    cancel: Cancel | None = None
    t_cancel: float | None = None

    @property
    def duration(self) -> float | None:
        end = self.t_answer if self.t_answer is not None else self.t_cancel
        return None if end is None else end - self.t


@dataclass
class Cassette:
    path: Path
    header: Header
    entries: list[Entry]
    footer: Footer | None
    problem: str = ""  # why an incomplete cassette is incomplete (only with allow_incomplete)
    damaged: list[Damage] = field(default_factory=list)  # unusable lines (lenient loads only)
    lenient: bool = False
    _decoded: dict[int, Message | None] = field(default_factory=dict, repr=False)  # by id()
    _notes: dict[int, str] = field(default_factory=dict, repr=False)  # id() -> why unusable
    _lines: list[int] = field(default_factory=list, repr=False)  # each entry's line number
    # (byte offset after the last whole entry line, entry lines, their running digest):
    # where a resumed recording carries on
    _tail: tuple[int, int, Any] = field(default=(0, 0, None), repr=False)

    @property
    def segments(self) -> list[int]:
        """The seq each recorded run starts at: 0, then one per resume mark."""
        return [0] + [e.seq for e in self.entries if e.kind == "mark"]

    @property
    def complete(self) -> bool:
        return self.footer is not None

    @property
    def blobs_dir(self) -> Path:
        return self.path.parent / (self.header.blobs or blobs_dir_name(self.path))

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: str | Path, *, allow_incomplete: bool = False, lenient: bool = False
    ) -> Cassette:
        """Read and check a cassette; refuse anything not exactly as the recorder wrote it.

        `allow_incomplete` accepts a cassette whose recording was cut short (for tracing a
        crashed session). `lenient` (for traces and resumes) also reads a damaged one: every
        line that cannot be used (not JSON, not a record, a record of a kind this version
        does not know, a digest that does not match) is kept in `damaged` with its line
        number, and the rest is read. Strict loading refuses all of those, with what to do.
        """
        path = Path(path)
        allow_incomplete = allow_incomplete or lenient
        hint = rerecord_hint(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CassetteError(
                f"no cassette at {path}; record one first (pytest --council-record=once, or "
                "run the session with recording on)"
            ) from None
        except OSError as e:
            raise CassetteError(f"cannot read cassette {path}: {e}") from None
        if not raw.strip():
            raise CassetteTruncated(f"cassette {path} is empty; {hint}")
        lines = raw.split(b"\n")
        ends_cleanly = lines[-1] == b""
        if ends_cleanly:
            lines.pop()
        header = _parse_header(path, lines[0], hint)
        entries: list[Entry] = []
        damaged: list[Damage] = []
        footer: Footer | None = None
        digest = hashlib.sha256()
        problem = ""
        offset = len(lines[0]) + 1  # bytes up to the end of the last whole entry line
        counted = 0  # entry lines, damaged ones included (what the end record counts)
        numbers: list[int] = []
        for n, line in enumerate(lines[1:], start=2):
            last = n == len(lines)
            try:
                obj = json.loads(line)
            except ValueError:
                if last and not ends_cleanly:
                    problem = f"its last line ({n}) is cut off mid-record"
                    if lenient:
                        damaged.append(Damage(n, "cut off mid-record", _show(line)))
                    break
                if not lenient:
                    raise CassetteCorrupt(
                        f"cassette {path} line {n} is not JSON ({line[:60]!r}...); the file is "
                        f"corrupted; {hint}"
                    ) from None
                damaged.append(Damage(n, "not JSON", _show(line)))
            else:
                if isinstance(obj, dict) and obj.get("kind") == "end":
                    if not last:
                        if not lenient:
                            raise CassetteCorrupt(
                                f"cassette {path} has records after its end record (line {n}); "
                                f"{hint}"
                            )
                        damaged.append(Damage(n, "an end record before the last line", ""))
                    else:
                        try:
                            footer = _validate(Footer, obj, path, n, hint)
                        except CassetteCorrupt as e:
                            if not lenient:
                                raise
                            damaged.append(Damage(n, str(e).split("; ")[0], _show(line)))
                        break
                else:
                    try:
                        entries.append(_validate(Entry, obj, path, n, hint))
                        numbers.append(n)
                    except CassetteCorrupt as e:
                        if not lenient:
                            raise
                        kind = obj.get("kind") if isinstance(obj, dict) else None
                        what = (
                            f"a record of unknown kind {kind!r}"
                            if isinstance(kind, str) and kind not in ENTRY_KINDS
                            else "not a valid record: " + str(e).split("(", 1)[-1].split(")")[0]
                        )
                        damaged.append(Damage(n, what, _show(line)))
            digest.update(line)
            digest.update(b"\n")
            counted += 1
            offset += len(line) + 1
        if footer is None:
            problem = problem or "it has no end record"
            if not allow_incomplete:
                raise CassetteTruncated(
                    f"cassette {path} is truncated: {problem} (after {len(entries)} entries); "
                    f"the recording was interrupted or the file was cut; {hint}"
                )
        else:
            if footer.entries != counted:
                what = (
                    f"cassette {path} says it holds {footer.entries} entries but has "
                    f"{counted}; lines were lost or added"
                )
                if not lenient:
                    raise CassetteCorrupt(f"{what}; {hint}")
                damaged.append(Damage(len(lines), what.split(" says ", 1)[1], ""))
            elif footer.digest != "sha256:" + digest.hexdigest():
                if not lenient:
                    raise CassetteCorrupt(
                        f"cassette {path} does not match its recorded digest: an entry was "
                        f"changed after recording; {hint}"
                    )
                damaged.append(
                    Damage(len(lines), "the digest does not match: an entry was changed", "")
                )
        cassette = cls(
            path=path,
            header=header,
            entries=entries,
            footer=footer,
            problem=problem,
            damaged=damaged,
            lenient=lenient,
        )
        cassette._tail = (offset, counted, digest)
        cassette._lines = numbers
        if not lenient:
            cassette._check_blobs(hint)
        return cassette

    def _check_blobs(self, hint: str) -> None:
        missing = [
            e.blob.digest
            for e in self.entries
            if e.blob and not (self.blobs_dir / blob_name(e.blob.digest)).is_file()
        ]
        if missing:
            raise CassetteCorrupt(
                f"cassette {self.path} refers to {len(missing)} value file(s) missing from "
                f"{self.blobs_dir} (first: {blob_name(missing[0])[:16]}...); copy the folder "
                f"along with the cassette, or {hint}"
            )

    # -- reading ---------------------------------------------------------------------------

    def message(self, entry: Entry) -> Message:
        """The entry's message, validated (and read from its blob when it was too big)."""
        msg = self._message(entry)
        if msg is None:
            raise CassetteCorrupt(
                f"cassette {self.path} entry {entry.seq} is not a message this framework "
                f"knows: {self._note(entry)}"
            )
        return msg

    def _message(self, entry: Entry) -> Message | None:
        """The message, or None for one that cannot be used (noted in `damaged`). A type
        this version does not know is never fatal; a known type in the wrong shape is, for a
        strict load."""
        key = id(entry)  # not the seq: a damaged file may repeat one
        if key in self._decoded:
            return self._decoded[key]
        problem = ""
        data = b""
        if entry.kind == "mark":
            problem = "mark"
        elif entry.blob is not None:
            try:
                data = (self.blobs_dir / blob_name(entry.blob.digest)).read_bytes()
            except OSError:
                problem = f"its value file {blob_name(entry.blob.digest)[:16]}... is missing"
            else:
                if sha256(data) != entry.blob.digest:
                    problem = f"value file {blob_name(entry.blob.digest)[:16]}... does not match its digest"
                    if not self.lenient:
                        raise CassetteCorrupt(
                            f"{problem} (cassette {self.path}); {rerecord_hint(self.path)}"
                        )
        else:
            data = json.dumps(entry.msg).encode()
        msg: Message | None = None
        if not problem:
            try:
                msg = decode(data)
            except MalformedMessage as e:
                mtype = _type_of(data)
                if mtype is not None and mtype not in KNOWN_TYPES:
                    problem = f"unknown message type {mtype!r} (shown as such, not used)"
                elif not self.lenient:
                    raise CassetteCorrupt(
                        f"cassette {self.path} entry {entry.seq} is not a valid message for "
                        f"this framework: {e}; {rerecord_hint(self.path)}"
                    ) from None
                else:
                    problem = f"not a valid message: {e}"
        if problem and problem != "mark":
            self._notes[key] = problem
        self._decoded[key] = msg
        return msg

    def _note(self, entry: Entry) -> str:
        return self._notes.get(id(entry), "")

    def unusable(self) -> list[Damage]:
        """Every line that could not be used: damaged lines, then entries whose message is
        of an unknown type or the wrong shape (after the messages were read)."""
        for e in self.entries:
            self._message(e)
        out = list(self.damaged)
        for i, e in enumerate(self.entries):
            problem = self._notes.get(id(e))
            if problem:
                line = self._lines[i] if i < len(self._lines) else 0
                out.append(Damage(line, f"entry {e.seq}: {problem}", e.subject))
        return sorted(out, key=lambda d: d.line)

    def messages(self, since: int = 0, until: int | None = None) -> Iterator[tuple[Entry, Message]]:
        """Every usable message (seq in [since, until)); the rest is in `unusable()`."""
        for e in self.entries:
            if e.seq < since or (until is not None and e.seq >= until):
                continue
            m = self._message(e)
            if m is not None:
                yield e, m

    def interactions(self, since: int = 0, until: int | None = None) -> list[Interaction]:
        """Every recorded call with its answer (or cancel), in the order the calls were seen."""
        by_id: dict[str, Interaction] = {}
        order: list[Interaction] = []
        early: dict[str, tuple[Entry, Message]] = {}  # an answer seen before its call
        for e, m in self.messages(since, until):
            if isinstance(m, Call):
                if m.id in by_id:  # re-sent (reconnect, silent callee): one call, answered once
                    continue
                it = Interaction(call=m, t=e.t, seq=e.seq)
                by_id[m.id] = it
                order.append(it)
                if m.id in early:
                    _attach(it, *early.pop(m.id))
            elif isinstance(m, Reply | Failure | Cancel):
                it = by_id.get(m.id)
                if it is None:
                    early[m.id] = (e, m)
                else:
                    _attach(it, e, m)
        return order

    def ref_blob(self, digest: str) -> bytes | None:
        """The saved contents of a Ref seen during recording, if the recorder could read it."""
        p = self.blobs_dir / blob_name(digest)
        return p.read_bytes() if p.is_file() else None

    def default_replay_peers(self) -> list[str]:
        """Peers to answer from the cassette when none are named: the header's list, else
        every peer that reported a model completion."""
        if self.header.replay:
            return list(self.header.replay)
        found = {
            m.peer
            for e, m in self.messages()
            if e.kind == "event" and getattr(m, "type", "") == "completion"
        }
        return sorted(found | set(self.header.models))


def _type_of(data: bytes) -> str | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    t = obj.get("type") if isinstance(obj, dict) else None
    return t if isinstance(t, str) else None


def _attach(it: Interaction, e: Entry, m: Message) -> None:
    if isinstance(m, Cancel):
        if it.cancel is None:
            it.cancel, it.t_cancel = m, e.t
    elif it.answer is None:
        it.answer, it.t_answer = m, e.t  # type: ignore[assignment]


def blobs_dir_name(path: Path) -> str:
    return path.name.removesuffix(".jsonl") + ".blobs"


def _parse_header(path: Path, line: bytes, hint: str) -> Header:
    try:
        obj = json.loads(line)
    except ValueError:
        raise CassetteCorrupt(
            f"{path} is not a council cassette: its first line is not JSON ({line[:40]!r}); "
            f"point at a .jsonl file written by the recorder, or {hint}"
        ) from None
    if not isinstance(obj, dict) or obj.get("kind") != "header" or obj.get("format") != FORMAT:
        raise CassetteCorrupt(
            f"{path} is not a council cassette (no {FORMAT!r} header on line 1); {hint}"
        )
    if obj.get("version") != FORMAT_VERSION:
        raise CassetteVersionError(
            f"cassette {path} is format version {obj.get('version')!r} (written by "
            f"rlm-council {obj.get('framework', '?')}); this rlm-council ({framework_version()}) "
            f"reads version {FORMAT_VERSION}; {hint}"
        )
    header = _validate(Header, obj, path, 1, hint)
    if header.messages != SCHEMA_VERSION:
        raise CassetteVersionError(
            f"cassette {path} holds messages of schema version {header.messages} (written by "
            f"rlm-council {header.framework}); this rlm-council ({framework_version()}) speaks "
            f"version {SCHEMA_VERSION}; {hint}"
        )
    return header


def _validate(model: type[_Strict], obj: Any, path: Path, n: int, hint: str) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<record>"
        raise CassetteCorrupt(
            f"cassette {path} line {n} is not a valid {model.__name__.lower()} record "
            f"({where}: {first['msg']}); {hint}"
        ) from None


def write(path: Path, header: Header, entries: list[Entry], **footer: Any) -> None:
    """Write a whole cassette (entries renumbered in order), e.g. a merge of two recordings."""
    import os
    import time

    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.model_dump_json().encode() + b"\n")
        for seq, e in enumerate(entries):
            record = {k: v for k, v in e.model_dump(mode="json").items() if v is not None}
            record["seq"] = seq
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
            f.write(line + b"\n")
            digest.update(line + b"\n")
        end = Footer(
            entries=len(entries), ended=time.time(), digest="sha256:" + digest.hexdigest(), **footer
        )
        f.write(end.model_dump_json().encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
