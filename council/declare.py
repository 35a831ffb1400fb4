"""Declaring a council: which peers there are, who may call whom, who takes the request.

The declaration is data (pydantic), so it is checked before anything starts, printed by
`council show`, sent to other processes as JSON, digested into recordings, and turned
into NATS rights. It names peers; it never holds live objects (a function peer is an
import path, resolved where it runs).

    council = Council(
        entry="chair",
        peers=[
            Agent("chair", model="gpt-4o-mini", calls=["critic", "ada"]),
            Agent("critic", model="gpt-4o-mini", instructions="Find logical flaws."),
            Human("ada"),
            Function(word_count),
        ],
    )
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from agents.function import default_name, first_paragraph, signature_of
from agents.human import SIGNATURE as HUMAN_SIGNATURE
from agents.limits import Compaction, Limits
from agents.prompt import PeerSpec
from agents.schema import TypeSpec, signature
from channels import subjects
from channels.errors import CouncilError, InvalidName
from council.mcp import MCP

__all__ = [
    "LLM",
    "MCP",
    "Agent",
    "Council",
    "Function",
    "Human",
    "Limits",
    "LoadError",
    "NotSerialisable",
    "TopologyError",
]


class TopologyError(CouncilError, ValueError):
    """A council that cannot start; `problems` lists every reason, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        n = len(problems)
        super().__init__(
            f"the council has {n} problem{'s' if n > 1 else ''}:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


class NotSerialisable(CouncilError, ValueError):
    """Part of a declaration that another process could not load (a lambda, a closure)."""


class LoadError(CouncilError, ValueError):
    """A declaration (or a function it names) that cannot be loaded here."""


class UnknownPeer(CouncilError, KeyError):
    """A name that is no peer of the council (a KeyError too, for lookups that expect one)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0])


# -- peers --------------------------------------------------------------------------------


class _Peer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""

    def __init__(self, name: str | None = None, /, **data: Any) -> None:
        if name is not None:
            data["name"] = name
        super().__init__(**data)

    @property
    def signature(self) -> str:
        return "(prompt: str, context=None) -> str"

    @property
    def calls_(self) -> list[str]:
        """The declared peers this one may call."""
        return []

    def derived(self) -> dict[str, str]:
        """Names this peer brings with it (served or used under the hood) -> what they are."""
        return {}

    def spec(self) -> PeerSpec:
        """How a caller's model sees this peer."""
        return PeerSpec(self.name, self.description, self.signature)

    def line(self) -> str:
        return self.kind  # type: ignore[attr-defined]


class Agent(_Peer):
    """An RLM agent: a model working through a REPL, calling the peers in `calls`."""

    kind: Literal["agent"] = "agent"
    model: str | None = None
    instructions: str = ""
    calls: list[str] = Field(default_factory=list)
    can_spawn: bool = False
    limits: Limits = Field(default_factory=Limits)
    sandbox: Literal["on", "auto", "off"] = Field(
        default="on",
        description="confine the REPL worker (agents.repl.sandbox); 'auto' runs unsandboxed "
        "where the kernel cannot, and says so; 'on' refuses to",
    )
    concurrency: int = Field(
        default=8,
        ge=1,
        le=512,
        description="requests answered at once (each runs in a REPL worker process of its own)",
    )
    warm: int = Field(
        default=1,
        ge=0,
        le=512,
        description="REPL workers kept booted ahead of requests (more while busy: as many as "
        "were held at once, up to the agent's REPL names; back to this after a minute idle)",
    )
    output: TypeSpec | None = Field(
        default=None, description="the type of its answers (a pydantic model or TypeAdapter type)"
    )
    inputs: dict[str, TypeSpec] = Field(
        default_factory=dict, description="types of `context` and of named args it takes"
    )
    compaction: Compaction = Field(default_factory=Compaction)

    @field_validator("output", mode="before")
    @classmethod
    def _output_type(cls, value: Any) -> TypeSpec | None:
        return _type_spec(value)

    @field_validator("inputs", mode="before")
    @classmethod
    def _input_types(cls, value: Any) -> dict[str, TypeSpec]:
        return {k: TypeSpec.of(t) for k, t in (value or {}).items()}

    @property
    def signature(self) -> str:
        return signature(self.inputs, self.output)

    @property
    def repl_slots(self) -> int:
        """How many REPL workers may be up at once, so how many REPL names its rights cover:
        one per request in flight, and as many again per depth child agents run at (each
        depth has its own share, so a child never waits on a slot its parent holds)."""
        return self.concurrency * (1 + (self.limits.child_depths if self.can_spawn else 0))

    @property
    def calls_(self) -> list[str]:
        return list(self.calls)

    @property
    def model_peer(self) -> str:
        return f"{self.name}-model"

    @property
    def repl_peer(self) -> str:
        return f"{self.name}-repl"

    @property
    def child_peer(self) -> str:
        return f"{self.name}-child"

    def derived(self) -> dict[str, str]:
        out = {self.model_peer: "model peer", self.repl_peer: "REPL worker"}
        if self.can_spawn:
            out[self.child_peer] = "child agents"
        return out

    def line(self) -> str:
        bits = [f"agent  model={self.model or '?'}"]
        if self.can_spawn:
            bits.append("can spawn")
        if summary := self.limits.summary():
            bits.append(f"limits: {summary}")
        if self.sandbox != "on":
            bits.append(f"sandbox={self.sandbox}")
        if self.output is not None:
            bits.append(f"-> {self.output.name}")
        if self.instructions:
            bits.append(_quote(self.instructions))
        return "  ".join(bits)


class LLM(_Peer):
    """One model as a callable: prompt (plus context) in, text out."""

    kind: Literal["llm"] = "llm"
    model: str | None = None
    concurrency: int = Field(default=8, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    output: TypeSpec | None = Field(
        default=None, description="the type of its answers; asked for as structured output"
    )

    @field_validator("output", mode="before")
    @classmethod
    def _output_type(cls, value: Any) -> TypeSpec | None:
        return _type_spec(value)

    @property
    def signature(self) -> str:
        if self.output is None:
            return super().signature
        return f"(prompt: str, context=None) -> {self.output.describe()}"

    def line(self) -> str:
        typed = f"  -> {self.output.name}" if self.output is not None else ""
        return f"llm  model={self.model or '?'}{typed}"


class Human(_Peer):
    """A person at an endpoint (`council human`); questions wait for them durably."""

    kind: Literal["human"] = "human"

    @property
    def signature(self) -> str:
        return HUMAN_SIGNATURE

    @property
    def desk(self) -> str:
        """The endpoint's own name on the bus."""
        return f"{self.name}-desk"

    def derived(self) -> dict[str, str]:
        return {self.desk: "human endpoint"}

    def line(self) -> str:
        return "human"


class Function(_Peer):
    """A Python callable (sync or async) as a peer; its type hints are its signature.

    A parameter annotated `agents.function.Peers` lets it call the peers in `calls`.
    """

    kind: Literal["function"] = "function"
    fn: str = Field(description="import path, module:qualname (or /path/file.py:qualname)")
    signature_: str = Field(default="", alias="signature")
    calls: list[str] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _callable: Callable[..., Any] | None = PrivateAttr(default=None)

    def __init__(
        self,
        fn: Callable[..., Any] | str | None = None,
        /,
        name: str | None = None,
        description: str | None = None,
        **data: Any,
    ) -> None:
        target: Callable[..., Any] | None = None
        if isinstance(fn, str):
            data["fn"] = fn
        elif fn is not None:
            target = fn
            data["fn"] = import_path(fn)
            data.setdefault("signature", signature_of(fn))
        if name is not None:
            data["name"] = name
        elif target is not None:
            data["name"] = default_name(target)
        if description is not None:
            data["description"] = description
        elif target is not None:
            data["description"] = first_paragraph(target.__doc__)
        super().__init__(**data)
        self._callable = target

    @property
    def signature(self) -> str:
        return self.signature_ or "(prompt: str, context=None) -> Any"

    @property
    def calls_(self) -> list[str]:
        return list(self.calls)

    def __eq__(self, other: object) -> bool:  # data equality: the resolved function aside
        return isinstance(other, Function) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash((self.name, self.fn))

    def callable(self) -> Callable[..., Any]:
        """The function itself: the one declared, or imported from `fn` in this process."""
        if self._callable is None:
            self._callable = resolve(self.fn)
        return self._callable

    def line(self) -> str:
        return f"function {self.signature}  ({self.fn})"


def _type_spec(value: Any) -> TypeSpec | None:
    return None if value is None else TypeSpec.of(value)


PeerDecl = Annotated[Agent | LLM | Human | Function | MCP, Field(discriminator="kind")]

RESERVED = {"admin"}


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _quote(text: str, n: int = 48) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


# -- import paths -------------------------------------------------------------------------

_FILE_MARK = "__council_file__"


def import_path(fn: Callable[..., Any]) -> str:
    """`module:qualname`, or `/path/file.py:qualname` for code loaded from a file (or run as
    __main__), since that module name means nothing in another process."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    mod = sys.modules.get(module)
    file = getattr(mod, _FILE_MARK, None) or (
        getattr(mod, "__file__", None) if module == "__main__" else None
    )
    return f"{Path(file).resolve()}:{qualname}" if file else f"{module}:{qualname}"


def unloadable(path: str) -> str | None:
    """Why another process could not import `path`, or None if it could."""
    _, _, qualname = path.rpartition(":")
    if "<lambda>" in qualname:
        return "it is a lambda; define it with `def` at module level"
    if "<locals>" in qualname:
        return "it is defined inside another function; move it to module level"
    return None


def load_file(path: str | Path) -> Any:
    """Import a Python file as a module (once per process), marked so that functions in it
    serialise by file path."""
    path = Path(path).resolve()
    if not path.is_file():
        raise LoadError(f"{path} does not exist; give the path of a .py file")
    name = "council_file_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    setattr(module, _FILE_MARK, str(path))
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # so the file's own imports of its neighbours work
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise LoadError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def resolve(path: str) -> Any:
    """The object at `module:qualname` or `/path/file.py:qualname`."""
    where, sep, qualname = path.rpartition(":")
    if not sep or not where or not qualname:
        raise LoadError(f"{path!r} is not an import path; write it as module:name or file.py:name")
    if why := unloadable(path):
        raise LoadError(f"cannot load {path!r}: {why}")
    if where.endswith(".py") or "/" in where:
        obj: Any = load_file(where)
    else:
        try:
            obj = importlib.import_module(where)
        except ImportError as e:
            raise LoadError(
                f"cannot import module {where!r} for {path!r}: {e}; is it on PYTHONPATH?"
            ) from e
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoadError(
                f"{where!r} has no attribute {qualname!r} (looking up {path!r})"
            ) from None
    return obj


def load_target(target: str, default: str = "council") -> Council:
    """`FILE.py:name` or `module:name` (name defaults to `council`) -> the Council there."""
    where, sep, name = target.rpartition(":")
    if not sep:
        where, name = target, default
    obj = resolve(f"{where}:{name}")
    if callable(obj) and not isinstance(obj, Council):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise LoadError(
                f"{target} is a function that needs arguments {inspect.signature(obj)}; point at "
                "a Council, or at a function that builds one with no arguments"
            ) from None
        except ValueError:  # no signature to read (a builtin): let the call say
            pass
        try:
            obj = obj()
        except CouncilError:
            raise
        except (Exception, SystemExit) as e:  # SystemExit: a main() that parses sys.argv
            raise LoadError(
                f"{target}() raised {type(e).__name__}: {e}; fix it, or point at a Council"
            ) from e
    if not isinstance(obj, Council):
        raise LoadError(f"{target} is a {type(obj).__name__}, not a Council; point at a Council")
    return obj


# -- the council --------------------------------------------------------------------------


class Council(BaseModel):
    """Peers, their edges, and the entry peer that takes the request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entry: str
    peers: list[PeerDecl]
    model: str | None = Field(
        default=None, description="the model of every agent and LLM that names none"
    )
    description: str = ""

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self.check()

    # -- checking -------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Everything wrong with this declaration, each saying what to change."""
        out: list[str] = []
        seen: dict[str, str] = {}
        for p in self.peers:
            try:
                subjects.check_name(p.name, f"{p.kind} name")
            except InvalidName as e:
                out.append(str(e))
                continue
            if p.name in RESERVED:
                out.append(f"{p.kind} name {p.name!r} is reserved for the runner; rename it")
            if p.name in seen:
                out.append(
                    f"two peers are named {p.name!r} ({_a(seen[p.name])} and {_a(p.kind)}); "
                    "names must be unique"
                )
            seen[p.name] = p.kind
        for p in self.peers:
            for extra, what in p.derived().items():
                if extra in seen:
                    out.append(
                        f"peer {extra!r} clashes with the {what} of {p.kind} {p.name!r}; rename it"
                    )
                elif len(extra) > subjects.MAX_NAME:
                    out.append(
                        f"{p.kind} name {p.name!r} is too long: its {what} would be {extra!r}, "
                        f"over {subjects.MAX_NAME} characters"
                    )
        for p in self.peers:
            if isinstance(p, Agent | LLM) and not (p.model or self.model):
                out.append(
                    f"{p.kind} {p.name!r} has no model; give it model=... "
                    "(or the council a default model=...)"
                )
            for callee in p.calls_:
                if callee == p.name:
                    out.append(
                        f"{p.kind} {p.name!r} calls itself"
                        + ("; use can_spawn=True for child agents" if isinstance(p, Agent) else "")
                    )
                elif callee not in seen:
                    out.append(
                        f"{p.kind} {p.name!r} calls {callee!r}, which is not a peer of this "
                        f"council{_did_you_mean(callee, seen)}"
                    )
            summariser = p.compaction.model if isinstance(p, Agent) else None
            if summariser is not None and not isinstance(self._find(summariser), LLM):
                out.append(
                    f"agent {p.name!r} folds its turns with {summariser!r}, which is not an LLM "
                    "peer of this council; declare LLM(name=..., model=...) or drop compaction.model"
                )
            if len(set(p.calls_)) != len(p.calls_):
                out.append(f"{p.kind} {p.name!r} lists a callee twice in calls")
        if self.entry not in seen:
            out.append(
                f"entry {self.entry!r} is not a peer of this council{_did_you_mean(self.entry, seen)}"
            )
        if not self.peers:
            out.append("the council has no peers; list them in peers=[...]")
        return list(dict.fromkeys(out))  # a clash seen from both sides is one problem

    def check(self) -> Council:
        if problems := self.problems():
            raise TopologyError(problems)
        return self

    # -- reading it ----------------------------------------------------------------------

    def _find(self, name: str) -> Agent | LLM | Human | Function | MCP | None:
        return next((p for p in self.peers if p.name == name), None)

    def peer(self, name: str) -> Agent | LLM | Human | Function | MCP:
        for p in self.peers:
            if p.name == name:
                return p
        raise UnknownPeer(f"no peer {name!r} in this council; it has {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [p.name for p in self.peers]

    def model_of(self, peer: Agent | LLM) -> str:
        return peer.model or self.model or ""

    def with_model(self, model: str) -> Council:
        """The same council with every agent and LLM on `model` (`council run --model`)."""
        peers = [
            p.model_copy(update={"model": model}) if isinstance(p, Agent | LLM) else p
            for p in self.peers
        ]
        return self.model_copy(update={"peers": peers, "model": model})

    def with_sandbox(self, mode: str) -> Council:
        """The same council with every agent's REPL sandbox set to `mode` (`--sandbox`)."""
        peers = [
            p.model_copy(update={"sandbox": mode}) if isinstance(p, Agent) else p
            for p in self.peers
        ]
        return self.model_copy(update={"peers": peers})

    def specs(self, peer: Agent) -> list[PeerSpec]:
        """What agent `peer`'s model is told it may call."""
        return [self.peer(c).spec() for c in peer.calls]

    def edges(self) -> dict[str, list[str]]:
        """Every name that connects to the bus -> the names it may call (rights are built
        from this): declared peers, and the model peers, REPL workers and human endpoints
        they bring."""
        out: dict[str, list[str]] = {}
        for p in self.peers:
            if isinstance(p, Agent):
                calls = [*p.calls, p.model_peer, p.repl_peer]
                if p.can_spawn:
                    calls.append(p.child_peer)
                out[p.repl_peer] = list(calls)
                summariser = p.compaction.model
                out[p.name] = calls + ([summariser] if summariser not in (None, *calls) else [])
                out[p.model_peer] = []
            elif isinstance(p, Human):
                out[p.name] = []
                out[p.desk] = []
            elif isinstance(p, Function):
                out[p.name] = list(p.calls)
            else:
                out[p.name] = []
        return out

    def serves(self) -> dict[str, list[str]]:
        """Names answered on another name's connection: an agent serves its child agents,
        and its REPL worker may share its user."""
        return {
            p.name: [p.repl_peer, *([p.child_peer] if p.can_spawn else [])]
            for p in self.peers
            if isinstance(p, Agent)
        }

    def desks(self) -> dict[str, str]:
        """Each human -> its endpoint's name (rights give the pair the human's bucket)."""
        return {p.name: p.desk for p in self.peers if isinstance(p, Human)}

    def slots(self) -> dict[str, int]:
        """Names that stand for numbered families in the rights: an agent's REPL workers are
        `<agent>-repl`, `<agent>-repl-2`, ... up to its `repl_slots`."""
        return {p.repl_peer: p.repl_slots for p in self.peers if isinstance(p, Agent)}

    # -- data ----------------------------------------------------------------------------

    def to_json(self, *, indent: int | None = 2) -> str:
        """JSON another process can load with `Council.from_json`; refuses what it could
        not (lambdas, closures)."""
        bad = [
            f"function peer {p.name!r} ({p.fn}): {why}"
            for p in self.peers
            if isinstance(p, Function) and (why := unloadable(p.fn))
        ]
        if bad:
            raise NotSerialisable(
                "this council cannot be loaded in another process:\n"
                + "\n".join(f"  - {b}" for b in bad)
            )
        return self.model_dump_json(by_alias=True, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> Council:
        try:
            council = cls.model_validate_json(text)
        except ValidationError as e:
            raise LoadError(
                "not a council declaration: "
                + "; ".join(
                    f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                    for err in e.errors()[:5]
                )
            ) from None
        return council.check()

    def canonical(self) -> str:
        # Field names, not aliases: the same bytes council/record.py digests into cassettes.
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON: equal declarations, equal digests, in any process."""
        return "sha256:" + hashlib.sha256(self.canonical().encode()).hexdigest()

    # -- showing it ----------------------------------------------------------------------

    def show(self) -> str:
        """A tree from the entry peer along call edges; a peer met again is not re-expanded."""
        lines = [
            f"council  entry={self.entry}  peers={len(self.peers)}  {self.digest[:19]}",
        ]
        expanded: set[str] = set()

        def walk(name: str, prefix: str, last: bool, top: bool) -> Iterator[str]:
            p = self.peer(name)
            branch = "" if top else ("└── " if last else "├── ")
            again = name in expanded and bool(p.calls_)
            yield f"{prefix}{branch}{name}  {p.line()}{'  (see above)' if again else ''}"
            if again:
                return
            expanded.add(name)
            child_prefix = prefix if top else prefix + ("    " if last else "│   ")
            for i, callee in enumerate(p.calls_):
                yield from walk(callee, child_prefix, i == len(p.calls_) - 1, False)

        lines += walk(self.entry, "", True, True)
        reached = _reachable(self, self.entry)
        rest = [p.name for p in self.peers if p.name not in reached]
        if rest:
            lines.append("not reachable from the entry:")
            for name in rest:
                lines.append(f"  {name}  {self.peer(name).line()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.show()


def _reachable(council: Council, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        peer = council.peer(name)
        todo += peer.calls_
        if isinstance(peer, Agent) and peer.compaction.model:
            todo.append(peer.compaction.model)  # it writes the agent's summaries
    return seen


def _did_you_mean(name: str, known: dict[str, str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
