"""NATS rights generated from a topology, so the server (not the peers' good manners) keeps
each peer to its edges.

Input is plain data -- peer name -> the peers it may call -- so this layer needs nothing
from `council/`. Output is one NATS user per peer and the `authorization { users: [...] }`
block that makes a nats-server enforce it. A peer's user may then (S is the session):

- publish calls and cancels only along its edges and only with its own name as the caller
  token (`council.S.call.<callee>.<own name>`): the server vouches for who called;
- publish replies and liveness signals only into the inboxes of the names that may call it
  (`_INBOX.S.<caller>.>`, the reverse edges plus the runner `admin`). There is no
  `allow_responses`, so a reply is allowed however long the call takes (no 2-minute expiry);
- publish events only under its own names;
- subscribe only to its own call and cancel subjects and its own inbox;
- use the store through the exact data-plane subjects of its own session
  (`channels.store.peer_subjects`), and, for a human and its endpoint, the human's own
  question bucket (`human_subjects`): never a JetStream management call, never another
  session's data. Only the runner (`S:admin`) creates, purges or deletes streams and buckets.

A name may stand for a numbered family (`slots`): `<agent>-repl` with N slots also covers
`<agent>-repl-2` .. `<agent>-repl-N`, the names an agent's concurrent REPL workers take.
Whoever may call the name may call every member; each member that serves is a user of its
own, held to its own name, so one request's worker cannot listen in on, or answer for,
another's.

Credentials. The server's config holds only bcrypt hashes of the users' passwords; each
plain password lives in the memory of the process it belongs to (a REPL worker gets its own
on stdin). Why bcrypt rather than NKEYs: it keeps the user/password login every connection
already uses (no seed files or signing callbacks through the bus, the REPL worker and the
CLI), and nats-server checks a bcrypt hash natively. The passwords are 192-bit random
tokens, so the work factor protects nothing (no one can guess such a password, hashed or
not) while the server pays it on every connect, and every REPL worker connects when it
starts: the hashes use bcrypt's lowest cost, 4. Measured (benchmarks/rights.py): a connect
takes 2.0 ms at cost 4 against 1.1 ms with a plain password, and 254 ms at cost 11 (the
default of `nats server passwd`).

For an external server, `Rights.write(directory)` gives the operator the server's part
(`nats.conf`, hashes only, and `rights.json`, no secrets) and one credential file per user
(`<peer>.cred.json`, mode 0600), so each machine is handed only the logins it runs.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import bcrypt
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from channels import subjects
from channels.errors import CouncilError
from channels.store import peer_subjects as store_subjects

ADMIN = "admin"
BCRYPT_COST = 4
"""bcrypt's minimum: the passwords are random 192-bit tokens (see the module docstring)."""

HUMAN_BUCKET_PREFIX = "council-human"
M = TypeVar("M", bound=BaseModel)


def human_bucket(session: str, human: str) -> str:
    """The KV bucket holding one human's questions, answers and finals in one session."""
    s = subjects.check_name(session, "session")
    return f"{HUMAN_BUCKET_PREFIX}-{s}-{subjects.check_name(human, 'human name')}"


def human_subjects(session: str, human: str, *, desk: bool) -> tuple[list[str], list[str]]:
    """(publish, subscribe) on a human's bucket: the human's peer writes questions and reads
    answers; its endpoint (`desk`) reads questions and finals and writes answers. Nobody
    else has any right on the bucket, so no peer can read a question or forge an answer."""
    b = human_bucket(session, human)
    kv, get = f"$KV.{b}", f"$JS.API.DIRECT.GET.KV_{b}"
    if desk:
        return [f"{kv}.a.*", get, f"{get}.>"], [f"{kv}.q.*", f"{kv}.f.*"]
    return [f"{kv}.q.*", f"{get}.{kv}.a.*"], [f"{kv}.a.*"]


class UserRights(BaseModel):
    """One NATS user as the server knows it: who it acts for, the hash of its password,
    and exactly which subjects it may use. Holds no secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer: str
    user: str
    password_hash: str
    publish: list[str]
    subscribe: list[str]

    def entry(self) -> str:
        """This user as an entry of a nats-server `users` list."""
        if self.publish == [">"] and self.subscribe == [">"]:
            perms = 'permissions: {publish: ">", subscribe: ">"}'
        else:
            perms = (
                f"permissions: {{publish: {{allow: {_list(self.publish)}}}, "
                f"subscribe: {{allow: {_list(self.subscribe)}}}}}"
            )
        return (
            f"{{user: {json.dumps(self.user)}, password: {json.dumps(self.password_hash)}, "
            f"{perms}}}"
        )


class Credential(BaseModel):
    """One connection's login: the only secret, handed to the one process that uses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session: str
    peer: str
    user: str
    password: str


class Rights(BaseModel):
    """Every user of one session (a peer's by peer name, plus the runner's admin user), and
    the credentials this process holds, in memory only: they are never serialized with the
    rights (`write` puts each in its own file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session: str
    users: dict[str, UserRights]
    admin: UserRights
    _secrets: dict[str, Credential] = PrivateAttr(default_factory=dict)

    def for_peer(self, peer: str) -> UserRights:
        try:
            return self.users[peer]
        except KeyError:
            raise KeyError(
                f"no NATS user for {peer!r} in session {self.session!r}; "
                f"known: {', '.join(sorted(self.users))}"
            ) from None

    def credential(self, peer: str) -> Credential:
        """`peer`'s login (`ADMIN` gives the runner's), if this process was given it."""
        if peer != ADMIN:
            self.for_peer(peer)  # KeyError naming the known peers
        try:
            return self._secrets[peer]
        except KeyError:
            raise CouncilError(
                f"this process holds no credentials for {peer!r} in session {self.session!r}; "
                f"pass its file from `council rights` ({cred_file_name(peer)}) with --rights"
            ) from None

    def credentials(self, peer: str) -> tuple[str, str]:
        """(user, password) for `peer`'s connection; `ADMIN` gives the runner's."""
        c = self.credential(peer)
        return c.user, c.password

    def holds(self, peer: str) -> bool:
        return peer in self._secrets

    def authorization(self) -> str:
        """The nats-server `authorization` block enforcing these rights (hashes only)."""
        entries = [self.admin, *self.users.values()]
        body = "\n".join(f"    {u.entry()}" for u in entries)
        return f"authorization {{\n  users: [\n{body}\n  ]\n}}\n"

    def with_credentials(self, creds: Iterable[Credential], *, check: bool = True) -> Rights:
        """A copy that holds `creds` too, each checked against this session's users (the
        check hashes each password once more: `rights()`, which made them, skips it)."""
        out = self.model_copy()
        out._secrets = dict(self._secrets)
        for c in creds:
            if not check:
                out._secrets[c.peer] = c
                continue
            u = self.admin if c.peer == ADMIN else self.users.get(c.peer)
            if c.session != self.session or u is None or u.user != c.user:
                raise CouncilError(
                    f"the credential of {c.peer!r} (session {c.session!r}) is not one of "
                    f"session {self.session!r}'s users; generate both with `council rights`"
                )
            if not bcrypt.checkpw(c.password.encode(), u.password_hash.encode()):
                raise CouncilError(
                    f"the credential of {c.peer!r} does not match rights.json of session "
                    f"{self.session!r}: they come from different `council rights` runs"
                )
            out._secrets[c.peer] = c
        return out

    # -- files for an external server -----------------------------------------------------

    def write(self, directory: str | Path, *, only: Iterable[str] | None = None) -> list[Path]:
        """Write what an operator of an external server needs into `directory` (mode 0700):
        `nats.conf` (the authorization block) and `rights.json` (the users, no secrets),
        then one `<peer>.cred.json` per credential held (or per peer in `only`), each 0600.
        Give each machine only the credential files of the peers it runs."""
        keep = None if only is None else set(only)
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.chmod(0o700)
        written = [
            _write_private(d / "nats.conf", self.authorization()),
            _write_private(d / RIGHTS_FILE, self.model_dump_json(indent=2)),
        ]
        for peer, c in sorted(self._secrets.items()):
            if keep is not None and peer not in keep:
                continue
            written.append(_write_private(d / cred_file_name(peer), c.model_dump_json(indent=2)))
        return written

    @classmethod
    def load(cls, path: str | Path) -> Rights:
        """Rights from a directory `write` made (with whichever credential files it holds),
        or from `rights.json` plus the credential files named after it."""
        p = Path(path)
        d = p if p.is_dir() else p.parent
        public = d / RIGHTS_FILE
        if not public.is_file():
            raise CouncilError(
                f"{d} has no {RIGHTS_FILE}; write the rights with `council rights --out {d}`"
            )
        rights = _read_model(cls, public)
        if p.is_file() and p.name != RIGHTS_FILE:  # one credential file: that login only
            return rights.with_credentials([_read_model(Credential, p)])
        return rights.with_credentials(
            _read_model(Credential, f) for f in sorted(d.glob(f"*{CRED_SUFFIX}"))
        )


RIGHTS_FILE = "rights.json"
CRED_SUFFIX = ".cred.json"


def cred_file_name(peer: str) -> str:
    return f"{peer}{CRED_SUFFIX}"


def _write_private(path: Path, text: str) -> Path:
    """Create (or truncate) `path` readable by its owner only, before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _read_model(model: type[M], path: Path) -> M:
    try:
        return model.model_validate_json(path.read_text())
    except (OSError, ValidationError) as e:
        raise CouncilError(
            f"{path} is not a {model.__name__} file from `council rights`: {e}"
        ) from None


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def _login(session: str, peer: str, user: str) -> tuple[Credential, str]:
    password = secrets.token_urlsafe(24)
    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_COST)).decode()
    return Credential(session=session, peer=peer, user=user, password=password), digest


def family(name: str, slots: int) -> list[str]:
    """`name` and its numbered variants up to `slots`: name, name-2, ..., name-<slots>."""
    return [name, *(f"{name}-{k}" for k in range(2, slots + 1))]


def _expand(names: Iterable[str], slots: Mapping[str, int]) -> list[str]:
    out: set[str] = set()
    for n in names:
        out.update(family(n, slots.get(n, 1)))
    return sorted(out)


def peer_subjects(
    session: str,
    names: Iterable[str],
    callees: Iterable[str],
    callers: Iterable[str],
    *,
    store: bool = True,
) -> tuple[list[str], list[str]]:
    """(publish, subscribe) of a user acting as `names` (expanded), calling `callees` and
    answering `callers` (the names whose calls it may receive, `admin` included)."""
    names, callees = sorted(set(names)), sorted(set(callees))
    publish = [subjects.call(session, c, n) for c in callees for n in names]
    publish += [subjects.cancel(session, c, n) for c in callees for n in names]
    publish += [subjects.presence(session, c) for c in callees]
    publish += [f"{subjects.inbox_prefix(session, k)}.>" for k in sorted(set(callers))]
    publish += [subjects.events(session, n) for n in names]
    subscribe = [subjects.call(session, n, subjects.ANY) for n in names]
    subscribe += [subjects.presence(session, n) for n in names]
    subscribe += [subjects.cancel(session, n, subjects.ANY) for n in names]
    subscribe += [f"{subjects.inbox_prefix(session, n)}.>" for n in names]
    if store:
        pub, sub = store_subjects(session)
        publish += pub
        subscribe += sub
    return publish, subscribe


def rights(
    session: str,
    calls: Mapping[str, Iterable[str]],
    *,
    serves: Mapping[str, Iterable[str]] | None = None,
    store: bool = True,
    slots: Mapping[str, int] | None = None,
    humans: Mapping[str, str] | None = None,
) -> Rights:
    """One user per key of `calls` (peer -> the peers it may call), plus an admin user; the
    returned Rights hold every credential (the runner's process hands them out).

    A name that appears only as a callee gets no user of its own: list it as a key (with no
    callees) if something must serve it. `serves` are further names a peer answers on its
    user (an agent's child agent, its REPL worker). `slots` (name -> N) makes a name stand
    for itself and `<name>-2` .. `<name>-N`, to callers and servers alike. `humans` (human ->
    its endpoint's name) gives each the rights on the human's question bucket.
    """
    subjects.check_name(session, "session")
    serves, slots, humans = serves or {}, slots or {}, humans or {}
    for name, n in slots.items():
        if n < 1:
            raise ValueError(f"slots[{name!r}] = {n}; a name has at least 1 slot")
        subjects.check_name(f"{name}-{n}", "numbered name")  # the longest one still fits
    names = {
        peer: _expand({subjects.check_name(peer, "peer name"), *serves.get(peer, ())}, slots)
        for peer in calls
    }
    callees = {peer: _expand(set(c), slots) for peer, c in calls.items()}
    desks = {desk: human for human, desk in humans.items()}
    users: dict[str, UserRights] = {}
    creds: list[Credential] = []
    for peer in calls:
        callers = {ADMIN} | {
            n for other in calls if set(names[peer]) & set(callees[other]) for n in names[other]
        }
        # A numbered family that serves (an agent's REPL workers) is one user per member,
        # each held to its own name: code in one worker cannot listen to, or answer for,
        # the calls of another request's worker.
        members = family(peer, slots[peer]) if peer in slots else [peer]
        for member in members:
            mine = {member} if len(members) > 1 else set(names[peer])
            publish, subscribe = peer_subjects(session, mine, callees[peer], callers, store=store)
            for human, desk in ((peer, False), (desks.get(peer), True)):
                if human in humans:
                    pub, sub = human_subjects(session, human, desk=desk)
                    publish, subscribe = publish + pub, subscribe + sub
            cred, digest = _login(session, member, f"{session}.{member}")
            users[member] = UserRights(
                peer=member,
                user=cred.user,
                password_hash=digest,
                publish=publish,
                subscribe=subscribe,
            )
            creds.append(cred)
    cred, digest = _login(session, ADMIN, f"{session}:{ADMIN}")  # ":" is never in a peer name
    admin = UserRights(
        peer=ADMIN, user=cred.user, password_hash=digest, publish=[">"], subscribe=[">"]
    )
    return Rights(session=session, users=users, admin=admin).with_credentials(
        [*creds, cred], check=False
    )
