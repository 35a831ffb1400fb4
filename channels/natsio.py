"""What every user of a raw nats-py connection here needs around it, in one place."""

from __future__ import annotations

from collections.abc import Iterable

import anyio
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription


async def settle(nc: NATS) -> None:
    """Return once the server has processed everything this connection sent so far.

    nats-py writes a flush's PING straight to the socket, ahead of commands still in its
    buffer, so one `flush()` can come back before the server has seen a SUB sent just
    before it (a peer that is "serving" yet answers no one). The second PING is written
    after the first round trip, by which time the buffer has gone out ahead of it.
    """
    await nc.flush()
    await nc.flush()


async def drain(subs: Iterable[Subscription], timeout: float = 10.0) -> None:
    """Drop subscriptions after handling what the server had already routed to them: a
    listener closing just after the answer it should record reached its neighbour would
    otherwise lose it. Bounded, shielded, and quiet when the connection is already gone."""
    subs = list(subs)
    with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
        for sub in subs:
            try:
                await sub.drain()
            except Exception:
                pass
    await unsubscribe(subs)


async def unsubscribe(subs: Iterable[Subscription]) -> None:
    """Drop subscriptions on the way out, shielded from cancellation. One that is already
    gone (connection closed, server restarting) is nothing to raise from a `finally`."""
    with anyio.CancelScope(shield=True):
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
