"""What an agent is working on, for a scripted model behind its model peer to read.

A scripted model in a test wants the agent's request and input as fields, not parsed
out of the prompt. They are not sent with the model calls (that would put the input in
every model request, and in every recording's match key); an agent and its own model
peer run in one process (the agent brings it), so the agent notes the call it is
answering here and the LLM peer looks it up by the model call's parent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from channels.messages import Call, Value

_open: dict[str, tuple[str, Value]] = {}


@contextmanager
def working_on(call: Call) -> Iterator[None]:
    _open[call.id] = (call.prompt, call.context)
    try:
        yield
    finally:
        _open.pop(call.id, None)


def of(call: Call) -> tuple[str, Value] | None:
    """The (request, context) of the agent run that made this model call, if it is here."""
    return _open.get(call.parent) if call.parent else None
