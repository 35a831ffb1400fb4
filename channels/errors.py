"""Typed errors. A caller catches the kind it can handle; the rest carry a fix in their message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from channels.messages import Failure, Usage


class CouncilError(Exception):
    """Base of every error this framework raises on purpose."""


class MalformedMessage(CouncilError, ValueError):
    """Bytes that are not a valid message of this schema version."""


class InvalidName(CouncilError, ValueError):
    """A peer or session name that cannot be a NATS subject token."""


class ServerError(CouncilError, RuntimeError):
    """The embedded nats-server could not be found, started or reached."""


class CallFailed(CouncilError):
    """A call ended with a `Failure`; one subclass per `Failure.kind`."""

    kind: ClassVar[str] = "peer_error"

    def __init__(
        self,
        message: str,
        *,
        partial: Any = None,
        usage: Usage | None = None,
        call_id: str = "",
        callee: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.partial = partial
        self.usage = usage
        self.call_id = call_id
        self.callee = callee

    def to_failure(self, call_id: str | None = None) -> Failure:
        from channels.messages import Failure, Usage

        return Failure(
            id=call_id if call_id is not None else self.call_id,
            kind=self.kind,  # type: ignore[arg-type]
            message=self.message,
            partial=self.partial,
            usage=self.usage or Usage(),
        )


class CallTimeout(CallFailed, TimeoutError):
    kind = "timeout"


class Unavailable(CallFailed):
    kind = "unavailable"


class BadRequest(CallFailed):
    kind = "bad_request"


class BudgetExhausted(CallFailed):
    kind = "budget_exhausted"


class DepthExceeded(CallFailed):
    kind = "depth_exceeded"


class PeerError(CallFailed):
    kind = "peer_error"


class CallCancelled(CallFailed):
    kind = "cancelled"


class PermissionDenied(CallFailed):
    kind = "permission_denied"


FAILURE_ERRORS: dict[str, type[CallFailed]] = {
    cls.kind: cls
    for cls in (
        CallTimeout,
        Unavailable,
        BadRequest,
        BudgetExhausted,
        DepthExceeded,
        PeerError,
        CallCancelled,
        PermissionDenied,
    )
}


def error_for(failure: Failure, callee: str = "") -> CallFailed:
    cls = FAILURE_ERRORS[failure.kind]
    return cls(
        failure.message,
        partial=failure.partial,
        usage=failure.usage,
        call_id=failure.id,
        callee=callee,
    )


class StoreError(CouncilError):
    """The shared store could not do what was asked (see the subclasses for the kinds)."""


class NotFound(StoreError, KeyError):
    """No value (or named variable) under this reference in any scope this store can see."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class IntegrityError(StoreError):
    """Stored bytes do not match their digest (corrupted or truncated): nothing is returned."""


class UnsupportedValue(StoreError, TypeError):
    """A value the store cannot hold: not text, bytes, or JSON-able data."""


class StoreUnavailable(StoreError):
    """The store did not answer within the deadline (server restarting, no stream leader,
    connection closed). Nothing was lost by the failed operation: retry it later."""


class NotProvisioned(StoreUnavailable):
    """The session's store does not exist: only the runner (admin) creates it."""


class StoreForbidden(StoreError, PermissionError):
    """An operation only the runner (admin) may do: keep, delete, drop, provision."""


class TooLarge(StoreError):
    """The value is bigger than the reader's limit; nothing was read or allocated."""
