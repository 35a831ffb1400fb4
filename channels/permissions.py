"""NATS rights generated from a topology, so the server (not the peers' good manners) keeps
each peer to its edges.

Input is plain data -- peer name -> the peers it may call -- so this layer needs nothing
from `council/`. Output is one NATS user per peer, and the `authorization { users: [...] }`
block that makes a nats-server enforce it. A peer's connection may then:

- publish calls (and cancels) only to the peers it may call,
- publish events only under its own names,
- answer the calls it receives (`allow_responses`), and nothing else on reply subjects,
- subscribe only to its own call/cancel subjects and its own reply inbox
  (`_INBOX.<session>.<peer>.>`, see `subjects.inbox_prefix`),
- use JetStream (the shared store, durable human questions).

A name may stand for a numbered family (`slots`): `<agent>-repl` with N slots also covers
`<agent>-repl-2` .. `<agent>-repl-N`, the names an agent's concurrent REPL workers take;
whoever may call or serve the name may call or serve every member of its family.

Store rights are coarse: any JetStream API subject, and value writes into the session's own
store scope. A peer could read (not call) another session's store on a shared server; give
each session its own NATS account to isolate stores completely.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from channels import subjects
from channels.store import PREFIX as STORE_PREFIX

ADMIN = "admin"

# JetStream: the API, KV and object-store data subjects, acks and flow-control replies.
STORE_PUBLISH = ("$JS.API.>", "$KV.>", "$O.>", "$JS.ACK.>", "$JS.FC.>")


def store_publish(session: str) -> list[str]:
    """What a peer publishes to use the store: JetStream, and writes of values only into
    its own session's scope (or kept values, which belong to no session)."""
    return [*STORE_PUBLISH, f"{STORE_PREFIX}.s.{session}.>", f"{STORE_PREFIX}.k.>"]


class UserRights(BaseModel):
    """One NATS user: who it acts for and exactly which subjects it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer: str
    user: str
    password: str
    publish: list[str]
    subscribe: list[str]
    allow_responses: bool = True

    def entry(self) -> str:
        """This user as an entry of a nats-server `users` list."""
        if self.publish == [">"] and self.subscribe == [">"]:
            perms = 'permissions: {publish: ">", subscribe: ">"}'
        else:
            resp = ", allow_responses: true" if self.allow_responses else ""
            perms = (
                f"permissions: {{publish: {{allow: {_list(self.publish)}}}, "
                f"subscribe: {{allow: {_list(self.subscribe)}}}{resp}}}"
            )
        return f"{{user: {json.dumps(self.user)}, password: {json.dumps(self.password)}, {perms}}}"


class Rights(BaseModel):
    """Every user of one session: a peer's rights by peer name, plus the runner's admin user."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session: str
    users: dict[str, UserRights]
    admin: UserRights

    def for_peer(self, peer: str) -> UserRights:
        try:
            return self.users[peer]
        except KeyError:
            raise KeyError(
                f"no NATS user for {peer!r} in session {self.session!r}; "
                f"known: {', '.join(sorted(self.users))}"
            ) from None

    def credentials(self, peer: str) -> tuple[str, str]:
        """(user, password) for `peer`'s connection; `ADMIN` gives the runner's."""
        u = self.admin if peer == ADMIN else self.for_peer(peer)
        return u.user, u.password

    def authorization(self) -> str:
        """The nats-server `authorization` block enforcing these rights."""
        entries = [self.admin, *self.users.values()]
        body = "\n".join(f"    {u.entry()}" for u in entries)
        return f"authorization {{\n  users: [\n{body}\n  ]\n}}\n"


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def _password() -> str:
    return secrets.token_urlsafe(24)


def family(name: str, slots: int) -> list[str]:
    """`name` and its numbered variants up to `slots`: name, name-2, ..., name-<slots>."""
    return [name, *(f"{name}-{k}" for k in range(2, slots + 1))]


def _expand(names: Iterable[str], slots: Mapping[str, int]) -> list[str]:
    out: set[str] = set()
    for n in names:
        out.update(family(n, slots.get(n, 1)))
    return sorted(out)


def peer_rights(
    session: str,
    peer: str,
    calls: Iterable[str],
    *,
    serves: Iterable[str] = (),
    store: bool = True,
    password: str | None = None,
    slots: Mapping[str, int] | None = None,
) -> UserRights:
    """The rights of one peer's user; `serves` are further names answered on the same user
    (an agent's child agent, its REPL worker); `slots` turns names into numbered families."""
    slots = slots or {}
    names = _expand({subjects.check_name(peer, "peer name"), *serves}, slots)
    callees = _expand(set(calls), slots)
    publish = [subjects.call(session, c) for c in callees]
    publish += [subjects.cancel(session, c) for c in callees]
    publish += [f"{subjects.PREFIX}.{session}.event.{n}.*" for n in names]
    subscribe = [subjects.call(session, n) for n in names]
    subscribe += [subjects.cancel(session, n) for n in names]
    subscribe += [f"{subjects.inbox_prefix(session, n)}.>" for n in names]
    if store:
        publish += store_publish(session)
    return UserRights(
        peer=peer,
        user=f"{session}.{peer}",
        password=password or _password(),
        publish=publish,
        subscribe=subscribe,
    )


def rights(
    session: str,
    calls: Mapping[str, Iterable[str]],
    *,
    serves: Mapping[str, Iterable[str]] | None = None,
    store: bool = True,
    slots: Mapping[str, int] | None = None,
) -> Rights:
    """One user per key of `calls` (peer -> the peers it may call), plus an admin user.

    A name that appears only as a callee gets no user of its own: list it as a key (with no
    callees) if something must serve it. `slots` (name -> N) makes a name stand for itself
    and `<name>-2` .. `<name>-N`, to callers and servers alike.
    """
    subjects.check_name(session, "session")
    serves = serves or {}
    for name, n in (slots or {}).items():
        if n < 1:
            raise ValueError(f"slots[{name!r}] = {n}; a name has at least 1 slot")
        subjects.check_name(f"{name}-{n}", "numbered name")  # the longest one still fits
    users = {
        peer: peer_rights(
            session, peer, callees, serves=serves.get(peer, ()), store=store, slots=slots
        )
        for peer, callees in calls.items()
    }
    admin = UserRights(
        peer=ADMIN,
        user=f"{session}:{ADMIN}",  # ":" is never in a peer name: no clash
        password=_password(),
        publish=[">"],
        subscribe=[">"],
    )
    return Rights(session=session, users=users, admin=admin)
