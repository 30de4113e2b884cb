"""A connection's messages waiting to be sent (ARCHITECTURE.md, "Live updates"): bounded,
so a consumer that does not read is found out and dropped rather than buffered without
bound. The bound applies while a send is under way: a send that does not return means the
socket's buffers are full (the peer is not reading); a burst queued in one go (a hundred
subscriptions' first states) is not slowness. One per WebSocket or SSE stream."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["HEARTBEAT", "Outbox"]

HEARTBEAT = b""  # what `get` answers when nothing came for a heartbeat's interval


class Outbox:
    __slots__ = ("items", "bound", "ready", "ended", "sending")

    def __init__(self, bound: int) -> None:
        self.items: deque[bytes] = deque()
        self.bound = bound
        self.ready = asyncio.Event()
        self.ended = False
        self.sending = False  # the consumer is in a send that has not returned yet

    def put(self, message: bytes, *, last: bool = False) -> bool:
        """Queue `message`; False when `bound` messages are waiting already (a slow consumer).
        `last`: nothing follows it, and it is queued past the bound (a closing message)."""
        if self.ended or (len(self.items) >= self.bound and self.sending and not last):
            return False
        self.items.append(message)
        self.ended = last
        self.ready.set()
        return True

    def end(self) -> None:
        self.ended = True
        self.ready.set()

    async def get(self, heartbeat: float) -> bytes | None:
        """The next message, HEARTBEAT after `heartbeat` seconds of nothing, None once ended and sent."""
        while not self.items:
            if self.ended:
                return None
            self.ready.clear()
            try:
                async with asyncio.timeout(heartbeat):
                    await self.ready.wait()
            except TimeoutError:
                return HEARTBEAT
        return self.items.popleft()

    async def send(self, send: Callable[[bytes], Awaitable[None]], message: bytes) -> None:
        self.sending = True
        try:
            await send(message)
        finally:
            self.sending = False
