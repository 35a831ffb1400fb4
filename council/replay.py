"""Replay: serve LLM and human peers from a cassette while everything else runs for real.

A live request is matched by callee plus a digest of what it asks (prompt, context, args),
never by call ids, deadlines, budgets or timestamps, which differ on every run. Among
identical requests the recorded answers are handed out in recorded order; distinct
requests match whatever order they arrive in, so a parallel fan-out replays no matter
how its calls interleave. A request the cassette does not hold fails the caller with
`bad_request` and a diff against the nearest recorded request, and is kept in
`Replayer.mismatches` so a test fails even when agent code swallowed the error.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from channels import log, redact
from channels.bus import Bus
from channels.errors import BadRequest, CallTimeout, error_for
from channels.messages import Call, Failure, Ref, Reply, Value
from channels.store import decode_value
from council.cassette import Cassette, CassetteError, Interaction

_log = log.get("council.replay")

Forward = Callable[[Call], Awaitable[Reply]]
MAX_DIFF_LINES = 40


class ReplayMismatch(CassetteError):
    """A live request the cassette holds no (unused) answer for."""

    def __init__(self, message: str, *, call: Call, nearest: Interaction | None, diff: str):
        super().__init__(message)
        self.call = call
        self.nearest = nearest
        self.diff = diff


class UnusedRecordings(CassetteError):
    """Strict replay: recorded requests the live run never made."""


# -- what a request is, for matching ------------------------------------------------------


def request_of(call: Call) -> dict[str, Any]:
    """The parts of a call that say what is asked; Refs by content, not by session scope.

    Masked as the recorder masks what it writes (channels/redact.py), so a live request
    that carries a credential matches its masked recording."""
    data = call.model_dump(mode="json", by_alias=True, include={"prompt", "context", "args"})
    return redact.value(
        {
            "callee": call.callee,
            "prompt": data["prompt"],
            "context": _strip_refs(data["context"]),
            "args": _strip_refs(data["args"]),
        }
    )


# Recorded failures a resume hands out again: the same request fails the same way. The others
# (timeouts, a peer that was down or erred, a cancelled call) are asked again, live.
_SETTLED_FAILURES = {"bad_request", "budget_exhausted", "depth_exceeded", "permission_denied"}


def settled(it: Interaction) -> bool:
    """Whether a recorded call ended in a way a resumed run should take as given."""
    a = it.answer
    return isinstance(a, Reply) or (isinstance(a, Failure) and a.kind in _SETTLED_FAILURES)


def request_digest(request: dict[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def render(request: dict[str, Any]) -> list[str]:
    """One line per leaf, multi-line text as a block: what a diff is readable over."""
    lines: list[str] = []

    def walk(path: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k in sorted(v):
                walk(f"{path}.{k}" if path else k, v[k])
        elif isinstance(v, list) and v:
            for i, x in enumerate(v):
                walk(f"{path}[{i}]", x)
        elif isinstance(v, str) and "\n" in v:
            lines.append(f"{path}: |")
            lines.extend("  " + line for line in v.split("\n"))
        else:
            lines.append(f"{path}: {json.dumps(v, ensure_ascii=False)}")

    walk("", request)
    return lines


def _refs_in(v: Any, out: dict[str, dict[str, Any]]) -> None:
    if isinstance(v, dict):
        if isinstance(v.get("$ref"), str):
            out.setdefault(v["$ref"], v)
            return
        for x in v.values():
            _refs_in(x, out)
    elif isinstance(v, list):
        for x in v:
            _refs_in(x, out)


def _strip_refs(v: Any) -> Any:
    if isinstance(v, dict):
        if isinstance(v.get("$ref"), str):
            return {"$ref": v["$ref"], "kind": v.get("kind"), "size": v.get("size")}
        return {k: _strip_refs(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_strip_refs(x) for x in v]
    return v


def _preview(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- the replayer -------------------------------------------------------------------------


@dataclass
class _Recorded:
    interaction: Interaction
    request: dict[str, Any]
    digest: str
    used: bool = False
    _lines: list[str] | None = field(default=None, repr=False)

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = render(self.request)
        return self._lines


class Replayer:
    """Answers calls to `peers` from `cassette`; one shared state for all of them."""

    def __init__(
        self,
        cassette: Cassette | str | Path,
        peers: Iterable[str] | None = None,
        *,
        strict: bool = False,
        forward: Forward | None = None,
        normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        resume: bool = False,
    ):
        """`normalize` rewrites a request (as `request_of` gives it) before matching, on both
        sides: for code whose requests carry what legitimately differs between runs (object
        addresses, timings in REPL output).

        A cassette that was resumed holds several runs (council/session.py): a replay plays
        the last one, the run that went on to the end. `resume` is for carrying on a run
        that was cut short (possibly more than once): every run recorded counts, only calls
        that were answered (or failed for good, see `settled`) are handed out, and anything
        else goes to `forward`."""
        self.normalize = normalize or (lambda request: request)
        if isinstance(cassette, Cassette):
            self.cassette = cassette
        else:
            self.cassette = Cassette.load(cassette, lenient=resume)
        names = list(peers) if peers is not None else self.cassette.default_replay_peers()
        if not names:
            raise CassetteError(
                f"cassette {self.cassette.path} names no peers to replay and none were given; "
                "pass the names of the LLM and human peers to answer from it"
            )
        self.names = names
        self.strict = strict
        self.forward = forward
        self.mismatches: list[ReplayMismatch] = []
        self.forwarded: list[Call] = []
        self.served = 0
        self._recorded: list[_Recorded] = []
        self._index: dict[str, deque[_Recorded]] = {}
        wanted = set(names)
        starts = self.cassette.segments
        bounds = list(zip(starts, [*starts[1:], None], strict=True))
        for since, until in bounds if resume else bounds[-1:]:
            run = self.cassette.interactions(since, until)
            # A resumed run replays what the runs before it were answered, then goes on; so
            # per request the run with the most answers holds them all, in order.
            index: dict[str, deque[_Recorded]] = {}
            for it in run:
                if it.call.callee not in wanted:
                    continue
                if resume and not (settled(it) and self._refs_saved(it)):
                    continue
                req = self.normalize(request_of(it.call))
                rec = _Recorded(it, req, request_digest(req))
                index.setdefault(rec.digest, deque()).append(rec)
            for digest, queue in index.items():
                if len(queue) > len(self._index.get(digest, ())):
                    self._index[digest] = queue
        self._recorded = sorted(
            (r for q in self._index.values() for r in q), key=lambda r: r.interaction.seq
        )

    def _refs_saved(self, it: Interaction) -> bool:
        """Whether every Ref in the recorded answer can be served (a run cut short never
        saved the contents of its Refs: those calls are asked again)."""
        refs: dict[str, dict[str, Any]] = {}
        answer = it.answer
        if answer is not None:
            _refs_in(answer.model_dump(mode="json", by_alias=True), refs)
        return all(self.cassette.ref_blob(digest) is not None for digest in refs)

    def peers(self) -> list[ReplayPeer]:
        return [ReplayPeer(self, name) for name in self.names]

    @asynccontextmanager
    async def serving(self, url: str, session: str) -> AsyncIterator[Replayer]:
        """Serve every replayed peer, each on its own connection, for the block's length."""
        buses: list[Bus] = []
        try:
            async with anyio.create_task_group() as tg:
                try:
                    for peer in self.peers():
                        bus = await Bus.connect(url, session=session, name=peer.name)
                        buses.append(bus)
                        await tg.start(peer.run, bus)
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # the block's own error, as itself
                raise group.exceptions[0] from None
            raise
        finally:
            for bus in buses:
                await bus.close()

    # -- answering ----------------------------------------------------------------------

    async def answer(self, call: Call, bus: Bus | None = None) -> Reply:
        req = self.normalize(request_of(call))
        queue = self._index.get(request_digest(req))
        if not queue:
            if self.forward is not None:
                self.forwarded.append(call)
                return await self.forward(call)
            mismatch = self._mismatch(call, req)
            self.mismatches.append(mismatch)
            _log.warning("replay.mismatch", call=call.id, callee=call.callee, caller=call.caller)
            raise BadRequest(str(mismatch), call_id=call.id, callee=call.callee)
        rec = queue.popleft()
        rec.used = True
        self.served += 1
        return await self._play(rec.interaction, call, bus)

    async def _play(self, it: Interaction, call: Call, bus: Bus | None) -> Reply:
        answer = it.answer
        if isinstance(answer, Failure):
            raise error_for(answer, call.callee)
        if isinstance(answer, Reply):
            value = answer.value
            if answer.spilled and isinstance(value, Ref):
                value = self._restore(value)  # the bus spills it again if it must
            else:
                value = await self._reput_refs(value, bus)
            return Reply(value=value, usage=answer.usage)
        # Recorded without an answer: the caller gave up (timeout or cancel). Do the same
        # after as long as it took then, unless this run's caller gives up first.
        waited = it.duration or 0.0
        remaining = call.remaining()
        await anyio.sleep(max(0.0, min(waited, remaining if remaining is not None else waited)))
        raise CallTimeout(
            f"replay: {call.callee!r} was never answered in the recording (the caller gave up "
            f"after {waited:.3g}s)",
            call_id=call.id,
            callee=call.callee,
        )

    def _saved(self, ref: Ref) -> Any:
        """A Ref's value as saved beside the cassette (the recorded session's store is gone)."""
        data = self.cassette.ref_blob(ref.digest)
        if data is None:
            raise CassetteError(
                f"cassette {self.cassette.path} lacks the contents of {ref!r}; the recorder "
                "could not read it from the session's store. Re-record with the store reachable "
                "from the recorder's connection"
            )
        return decode_value(ref.kind, data)

    def _restore(self, ref: Ref) -> Value:
        return self._saved(ref)

    async def _reput_refs(self, value: Any, bus: Bus | None) -> Any:
        """Refs in a replayed answer point into the recorded session's store: put the saved
        contents into this session's store, so the caller can read them."""
        if isinstance(value, Ref):
            if self.cassette.ref_blob(value.digest) is None:
                return value  # may still be readable (kept data); else the reader says so
            store = await _store_of(bus)
            if store is None:
                return value
            return await store.put(self._saved(value), keep=not value.scope)
        if isinstance(value, list):
            return [await self._reput_refs(v, bus) for v in value]
        if isinstance(value, dict):
            return {k: await self._reput_refs(v, bus) for k, v in value.items()}
        return value

    def _mismatch(self, call: Call, req: dict[str, Any]) -> ReplayMismatch:
        where = (
            f"{call.caller} -> {call.callee} call {call.id[:12]} "
            f'(prompt "{_preview(call.prompt)}", depth {call.depth})'
        )
        digest = request_digest(req)
        same = [r for r in self._recorded if r.digest == digest]
        if same:
            msg = (
                f"replay: {where} was recorded {len(same)} time(s) and every recorded answer "
                f"has been used; this run makes it more often than the recording did"
            )
            return ReplayMismatch(
                msg + _fix_hint(self), call=call, nearest=same[-1].interaction, diff=""
            )
        lines = render(req)
        nearest = _nearest(lines, call.callee, self._recorded)
        if nearest is None:
            msg = (
                f"replay: {where} has no recorded counterpart: cassette "
                f"{self.cassette.path} holds no calls to {call.callee!r}"
            )
            return ReplayMismatch(msg + _fix_hint(self), call=call, nearest=None, diff="")
        rec, ratio = nearest
        diff_lines = list(
            difflib.unified_diff(rec.lines, lines, "recorded", "this run", n=2, lineterm="")
        )
        if len(diff_lines) > MAX_DIFF_LINES:
            cut = len(diff_lines) - MAX_DIFF_LINES
            diff_lines = [*diff_lines[:MAX_DIFF_LINES], f"... ({cut} more diff lines)"]
        diff = "\n".join(diff_lines)
        old = rec.interaction.call
        msg = (
            f"replay: {where} is not in cassette {self.cassette.path}.\n"
            f"Nearest recorded request: entry {rec.interaction.seq}, {old.caller} -> "
            f"{old.callee} ({ratio:.0%} similar{', already used' if rec.used else ''}):\n{diff}"
        )
        return ReplayMismatch(msg + _fix_hint(self), call=call, nearest=rec.interaction, diff=diff)

    # -- the end of a replay ------------------------------------------------------------

    def unused(self) -> list[Interaction]:
        return [r.interaction for r in self._recorded if not r.used]

    def report(self) -> str:
        unused = self.unused()
        parts = [
            f"replayed {self.served} of {len(self._recorded)} recorded calls to "
            f"{', '.join(self.names)} from {self.cassette.path}"
        ]
        if self.mismatches:
            parts.append(f"{len(self.mismatches)} request(s) not in the cassette")
        if self.forwarded:
            parts.append(f"{len(self.forwarded)} new request(s) answered live")
        if unused:
            shown = "; ".join(
                f'#{it.seq} {it.call.caller} -> {it.call.callee} "{_preview(it.call.prompt, 40)}"'
                for it in unused[:5]
            )
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            parts.append(f"{len(unused)} recorded call(s) never requested: {shown}{more}")
        return "; ".join(parts)

    def check(self, *, strict: bool | None = None) -> None:
        """Raise if the replay went wrong: the first mismatch, or (strict) unused recordings."""
        if self.mismatches:
            first = self.mismatches[0]
            if len(self.mismatches) > 1:
                raise ReplayMismatch(
                    f"{len(self.mismatches)} requests were not in the cassette; the first:\n"
                    f"{first}",
                    call=first.call,
                    nearest=first.nearest,
                    diff=first.diff,
                )
            raise first
        if (self.strict if strict is None else strict) and self.unused():
            raise UnusedRecordings(
                f"strict replay: {self.report()}. The code no longer makes these calls; "
                "re-record the cassette (pytest --council-record=all) if that is intended"
            )


def _fix_hint(replayer: Replayer) -> str:
    return (
        "\nIf the change is intended, re-record: pytest --council-record=new_episodes "
        f"(or =all), or record the session again into {replayer.cassette.path}."
    )


def _nearest(
    lines: list[str], callee: str, recorded: list[_Recorded]
) -> tuple[_Recorded, float] | None:
    """The most similar recorded request, same callee first: character-level similarity,
    since a changed request often differs in one line from many that differ in one line."""
    pool = [r for r in recorded if r.interaction.call.callee == callee] or recorded
    if not pool:
        return None
    text = "\n".join(lines)
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(text)
    if sum(len(r.request.get("prompt", "")) for r in pool) + len(pool) * len(text) > 3_000_000:
        # Too much to compare exactly on an error path: keep the best by the cheap bound.
        ranked = []
        for r in pool:
            matcher.set_seq1("\n".join(r.lines))
            ranked.append((matcher.quick_ratio(), not r.used, id(r), r))
        ranked.sort(reverse=True)
        pool = [r for *_, r in ranked[:50]]
    best: tuple[_Recorded, float] | None = None
    for r in pool:
        matcher.set_seq1("\n".join(r.lines))
        ratio = matcher.ratio()
        if best is None or ratio > best[1] or (ratio == best[1] and best[0].used and not r.used):
            best = (r, ratio)
    return best


async def _store_of(bus: Bus | None) -> Any:
    store = getattr(bus, "store", None) if bus is not None else None
    if callable(store):
        store = store()
    if inspect.isawaitable(store):
        store = await store
    return store


class ReplayPeer:
    """A peer that answers from a cassette: the same shape as every other peer."""

    def __init__(self, replayer: Replayer, name: str, *, concurrency: int = 1024):
        self.replayer = replayer
        self.name = name
        self.description = f"{name}, answered from cassette {replayer.cassette.path.name}"
        self.signature = "(prompt: str, context=None, **args) -> str"
        self.concurrency = concurrency

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        async def handler(call: Call) -> Reply:
            return await self.replayer.answer(call, bus)

        await bus.serve(self.name, handler, concurrency=self.concurrency, task_status=task_status)
