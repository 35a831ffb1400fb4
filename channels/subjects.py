"""Every NATS subject the framework uses is built and parsed here, and nowhere else.

Layout (one session is one namespace, so permissions and cleanup are per session):

    council.<session>.call.<callee>.<caller>     requests to a peer (queue group = callee)
    council.<session>.cancel.<callee>.<caller>   a caller giving up on a call
    council.<session>.event.<peer>.<type>        fire-and-forget events
    _INBOX.<session>.<peer>.>                    the reply inbox of a peer's connection
    council-here.<session>.<peer>                "is anyone serving <peer>?" (queue group)

Presence sits outside `council.<session>.>` on purpose: a recorder or progress view
listening on the whole session also hears calls to a peer nobody serves, so the server no
longer answers such a call with "no responders"; nothing but servers listens here.

The caller's name is the last token of a call so that the server, which lets each user
publish only with its own names there, vouches for who called: a callee believes the
subject, never the body. Answers go only to a reply subject inside the caller's inbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from channels.errors import InvalidName

PREFIX = "council"
MAX_NAME = 64
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

Verb = Literal["call", "cancel", "event"]


def check_name(name: str, what: str = "name") -> str:
    """Refuse a name that is not a safe subject token, saying which character and why."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME:
        raise InvalidName(
            f"{what} {name!r} is {len(name)} characters long; the limit is {MAX_NAME}"
        )
    if _TOKEN.fullmatch(name):
        return name
    for i, ch in enumerate(name):
        if not _TOKEN.fullmatch(ch):
            break
    reason = {
        ".": "NATS uses '.' to separate subject tokens",
        "*": "'*' is a NATS wildcard",
        ">": "'>' is a NATS wildcard",
    }.get(
        ch,
        "whitespace and punctuation are unsafe in NATS subjects"
        if ch.isascii()
        else "only ASCII is allowed in NATS subject tokens",
    )
    raise InvalidName(
        f"{what} {name!r} has {ch!r} at position {i}: {reason}; "
        "use only letters, digits, '-' and '_'"
    )


ANY = "*"
"""Stands for every caller in `call` and `cancel` (what a server subscribes to)."""


def _caller(caller: str) -> str:
    return caller if caller == ANY else check_name(caller, "caller name")


def call(session: str, callee: str, caller: str) -> str:
    """Where `caller` sends calls to `callee`; `caller=ANY` is what `callee` listens on."""
    return (
        f"{PREFIX}.{check_name(session, 'session')}.call."
        f"{check_name(callee, 'peer name')}.{_caller(caller)}"
    )


def cancel(session: str, callee: str, caller: str) -> str:
    """Where `caller` withdraws its calls to `callee`; `caller=ANY` for the listener."""
    return (
        f"{PREFIX}.{check_name(session, 'session')}.cancel."
        f"{check_name(callee, 'peer name')}.{_caller(caller)}"
    )


def event(session: str, peer: str, type_: str) -> str:
    return (
        f"{PREFIX}.{check_name(session, 'session')}.event."
        f"{check_name(peer, 'peer name')}.{check_name(type_, 'event type')}"
    )


def events(session: str, peer: str = "*") -> str:
    """Wildcard for every event of a session (or of one peer)."""
    peer = peer if peer == "*" else check_name(peer, "peer name")
    return f"{PREFIX}.{check_name(session, 'session')}.event.{peer}.*"


def presence(session: str, peer: str) -> str:
    return f"{PREFIX}-here.{check_name(session, 'session')}.{check_name(peer, 'peer name')}"


def session_wildcard(session: str) -> str:
    return f"{PREFIX}.{check_name(session, 'session')}.>"


def inbox_prefix(session: str, peer: str) -> str:
    return f"_INBOX.{check_name(session, 'session')}.{check_name(peer, 'peer name')}"


@lru_cache(maxsize=4096)
def _reply_prefix(session: str, caller: str) -> str | None:
    try:
        return inbox_prefix(session, caller) + "."
    except InvalidName:
        return None


def is_reply_to(reply: str | None, session: str, caller: str) -> bool:
    """True if `reply` lies inside `caller`'s own inbox: the only place an answer may go."""
    prefix = _reply_prefix(session, caller)
    return prefix is not None and bool(reply) and reply.startswith(prefix)  # type: ignore[union-attr]


@dataclass(frozen=True)
class Subject:
    session: str
    verb: Verb
    peer: str
    """The callee of a call or cancel, the sender of an event."""
    type: str | None = None
    """An event's type."""
    caller: str | None = None
    """Who sent a call or cancel (vouched for by the server under rights)."""


def parse(subject: str) -> Subject:
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != PREFIX or parts[2] not in ("call", "cancel", "event"):
        raise InvalidName(
            f"{subject!r} is not a council subject ({PREFIX}.<session>.<verb>.<peer>...)"
        )
    _, session, verb, peer, *rest = parts
    if len(rest) != 1:
        raise InvalidName(f"{subject!r} has the wrong number of tokens for a {verb} subject")
    check_name(session, "session")
    check_name(peer, "peer name")
    if verb == "event":
        return Subject(session, verb, peer, type=check_name(rest[0], "event type"))
    return Subject(session, verb, peer, caller=check_name(rest[0], "caller name"))  # type: ignore[arg-type]
