"""Every NATS subject the framework uses is built and parsed here, and nowhere else.

Layout (one session is one namespace, so permissions and cleanup are per session):

    council.<session>.call.<peer>            requests to a peer (queue group = peer)
    council.<session>.cancel.<peer>          a caller giving up on a call
    council.<session>.event.<peer>.<type>    fire-and-forget events
    _INBOX.<session>.<peer>.*                the reply inbox of a peer's connection
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


def call(session: str, peer: str) -> str:
    return f"{PREFIX}.{check_name(session, 'session')}.call.{check_name(peer, 'peer name')}"


def cancel(session: str, peer: str) -> str:
    return f"{PREFIX}.{check_name(session, 'session')}.cancel.{check_name(peer, 'peer name')}"


def event(session: str, peer: str, type_: str) -> str:
    return (
        f"{PREFIX}.{check_name(session, 'session')}.event."
        f"{check_name(peer, 'peer name')}.{check_name(type_, 'event type')}"
    )


def events(session: str, peer: str = "*") -> str:
    """Wildcard for every event of a session (or of one peer)."""
    peer = peer if peer == "*" else check_name(peer, "peer name")
    return f"{PREFIX}.{check_name(session, 'session')}.event.{peer}.*"


def session_wildcard(session: str) -> str:
    return f"{PREFIX}.{check_name(session, 'session')}.>"


def inbox_prefix(session: str, peer: str) -> str:
    return f"_INBOX.{check_name(session, 'session')}.{check_name(peer, 'peer name')}"


@dataclass(frozen=True)
class Subject:
    session: str
    verb: Verb
    peer: str
    type: str | None = None


def parse(subject: str) -> Subject:
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != PREFIX or parts[2] not in ("call", "cancel", "event"):
        raise InvalidName(
            f"{subject!r} is not a council subject ({PREFIX}.<session>.<verb>.<peer>)"
        )
    _, session, verb, peer, *rest = parts
    if (verb == "event" and len(rest) != 1) or (verb != "event" and rest):
        raise InvalidName(f"{subject!r} has the wrong number of tokens for a {verb} subject")
    check_name(session, "session")
    check_name(peer, "peer name")
    return Subject(session, verb, peer, rest[0] if rest else None)  # type: ignore[arg-type]
