"""A connection's messages waiting to be sent (ARCHITECTURE.md, "Live updates"): bounded,
so a consumer that does not read is found out and dropped rather than buffered without
bound. The bound applies while a send is under way: a send that does not return means the
socket's buffers are full (the peer is not reading); a burst queued in one go (a hundred
subscriptions' first states) is not slowness. One per WebSocket or SSE stream.

Heartbeats come from one task for every outbox (`heartbeats`), not a timer per wait: a
message is the common case, and at thousands of subscribers a timer set and cancelled
per message is a good share of the CPU."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque

__all__ = ["HEARTBEAT", "Outbox", "heartbeats"]

HEARTBEAT = b""  # queued by `heartbeats` into an outbox that had nothing to send for a while
_OPEN: weakref.WeakSet[Outbox] = weakref.WeakSet()


class Outbox:
    __slots__ = ("items", "bound", "waiter", "ended", "sending", "last", "__weakref__")

    def __init__(self, bound: int) -> None:
        self.items: deque[bytes] = deque()
        self.bound = bound
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.sending = False  # the consumer is in a send that has not returned yet (see `sent`)
        self.last = time.monotonic()  # when something was last queued
        _OPEN.add(self)

    def put(self, message: bytes, *, last: bool = False) -> bool:
        """Queue `message`; False when `bound` messages wait behind a send that has not
        returned (a slow consumer). `last`: nothing follows it, and it is queued past the
        bound (a closing message)."""
        if self.ended or (len(self.items) >= self.bound and self.sending and not last):
            return False
        self.items.append(message)
        self.ended = last
        self.last = time.monotonic()
        self._wake()
        return True

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> bytes | None:
        """The next message (HEARTBEAT when idle for a while), None once ended and all sent.
        The caller sets `sending` around its send: the bound applies while it is stuck."""
        while not self.items:
            if self.ended:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.items.popleft()


async def heartbeats(interval: float) -> None:
    """Every `interval` seconds, a HEARTBEAT into each outbox that queued nothing meanwhile
    (WebSocket ping, SSE comment line): idle connections stay open through proxies."""
    while True:
        await asyncio.sleep(interval)
        quiet = time.monotonic() - interval
        for outbox in list(_OPEN):
            if outbox.last <= quiet and not outbox.items:
                outbox.put(HEARTBEAT)
