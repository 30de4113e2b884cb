"""A connection's messages waiting to be sent (ARCHITECTURE.md, "Live updates"): bounded,
so a consumer that does not read is found out and dropped rather than buffered without
bound. One per WebSocket or SSE stream.

A message is *in flight* from `put` until the send that writes it has returned: starlette
gives no access to a WebSocket's write buffer, and a send returns once the transport took
the bytes (it blocks while the transport's buffer is over its high-water mark, because the
peer does not read), so what is in flight is what this process still holds for the peer.
It is counted in messages and in bytes (issue 25):

- `put` refuses past `bound` messages or `max_bytes` bytes in flight while a send is under
  way and has not returned: a slow consumer. A burst queued in one go while the socket
  takes what it is given (a round's changes for a hundred subscriptions) is not slowness.
- A send that has not returned after `stall` seconds is a slow consumer too, whatever the
  change rate: `stalled` is called (`heartbeats` checks), so a socket that never reads is
  let go within seconds even when nothing more is queued for it.
- First states are not pushed, they wait for room (`room`): until fewer than half of each
  bound is in flight here, and each of the outbox's `budgets` (its caller's, shared by the
  caller's connections) has room. So a first state is shaped as fast as its reader reads,
  never ahead of it into memory.

Heartbeats and stalled sends are checked by one task for every outbox (`heartbeats`), not
a timer per send: a message is the common case, and at thousands of subscribers a timer
set and cancelled per message is a good share of the CPU."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["HEARTBEAT", "SLICE", "Budget", "Outbox", "heartbeats"]

HEARTBEAT = b""  # queued by `heartbeats` into an outbox that had nothing to send for a while
# Seconds a writer (or a reader) may run on the event loop before it lets the loop poll:
# sends that do not block return at once, and a burst of them would hold the loop.
SLICE = 0.002
_TICK = 0.25  # seconds between checks for stalled sends
_OPEN: weakref.WeakSet[Outbox] = weakref.WeakSet()
_SENDING: set[Outbox] = set()  # outboxes in a send that has not returned (what `heartbeats` checks)


class Budget:
    """Messages in flight shared by several outboxes (one caller's connections): first
    states wait while `limit` are (`Outbox.room`); changes count but never wait."""

    __slots__ = ("__weakref__", "count", "limit", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.count = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def full(self) -> bool:
        return self.count >= self.limit

    def give(self, count: int) -> None:
        self.count -= count
        _wake(self.waiters, self.limit - self.count)


def _wake(waiters: deque[asyncio.Future[None]], room: int) -> None:
    """Wake up to `room` waiters, first come first (each checks again: no herd per message)."""
    while room > 0 and waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            room -= 1


class Outbox:
    __slots__ = ("items", "bound", "max_bytes", "stall", "stalled", "budgets", "waiter", "room_waiters", "ended",
                 "flight", "size", "sending_since", "last", "__weakref__")

    def __init__(self, bound: int, max_bytes: int = 1 << 20, stall: float = 5.0,
                 stalled: Callable[[], None] | None = None) -> None:
        self.items: deque[bytes] = deque()
        self.bound = bound
        self.max_bytes = max_bytes
        self.stall = stall
        self.stalled = stalled  # called once a send has not returned for `stall` seconds
        self.budgets: tuple[Budget, ...] = ()  # shared with other outboxes (the caller's)
        self.waiter: asyncio.Future[None] | None = None
        self.room_waiters: deque[asyncio.Future[None]] | None = None  # made when a first state waits
        self.ended = False
        self.flight = 0  # messages in flight: queued, or in a send that has not returned
        self.size = 0  # their bytes
        self.sending_since: float | None = None  # when the send under way began
        self.last = time.monotonic()  # when something was last queued
        _OPEN.add(self)

    def put(self, message: bytes, *, last: bool = False) -> bool:
        """Queue `message`; False when the outbox has ended, or when `bound` messages or
        `max_bytes` bytes are in flight behind a send that has not returned (a slow
        consumer). `last`: nothing follows it, and it is queued past the bounds (a closing
        message)."""
        if self.ended or (not last and self.sending_since is not None
                          and (self.flight >= self.bound or self.size + len(message) > self.max_bytes)):
            return False
        self.items.append(message)
        self.flight += 1
        self.size += len(message)
        for budget in self.budgets:
            budget.count += 1
        self.ended = last
        self.last = time.monotonic()
        self._wake()
        return True

    def full(self) -> bool:
        """Whether a first state should wait: half of a bound in flight here (the other
        half is left for changes), or a budget full."""
        return (self.flight >= max(1, self.bound // 2) or self.size >= self.max_bytes // 2
                or any(budget.full() for budget in self.budgets))

    async def room(self) -> None:
        """Until a first-state message may be queued (see `full`), or the outbox has ended."""
        while not self.ended and self.full():
            waiter = asyncio.get_running_loop().create_future()
            if self.room_waiters is None:
                self.room_waiters = deque()
            self.room_waiters.append(waiter)
            for budget in self.budgets:
                if budget.full():
                    budget.waiters.append(waiter)
            await waiter

    def end(self) -> None:
        self.ended = True
        self._wake()
        if self.room_waiters:
            _wake(self.room_waiters, len(self.room_waiters))

    def clear(self) -> None:
        """Forget what is queued and not yet being sent (a right that ended: not sent late)."""
        dropped = len(self.items) - (1 if self.sending_since is not None and self.items else 0)
        while self.items and dropped > 0:
            self._settle(len(self.items.pop()))
            dropped -= 1

    def release(self) -> None:
        """The connection is gone: what it held in flight is given back to the budgets."""
        self.end()
        self.items.clear()
        for budget in self.budgets:
            budget.give(self.flight)
        self.flight, self.size = 0, 0
        _SENDING.discard(self)

    def _settle(self, size: int) -> None:
        self.flight -= 1
        self.size -= size
        for budget in self.budgets:
            budget.give(1)
        if self.room_waiters and not self.full():
            _wake(self.room_waiters, max(1, self.bound // 2) - self.flight)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def send_each(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Send every message as it is queued (HEARTBEAT when idle for a while) until the
        outbox has ended and all is sent. A message stays in flight until its send returns;
        after `SLICE` seconds of sends that did not block, the loop is let to poll."""
        since = time.perf_counter()
        while True:
            while not self.items:
                if self.ended:
                    return
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
                since = time.perf_counter()
            message = self.items[0]  # left in `items` until sent: `clear` keeps it
            self.sending_since = time.monotonic()
            _SENDING.add(self)
            try:
                await send(message)
            finally:
                self.sending_since = None
                _SENDING.discard(self)
            if self.items and self.items[0] is message:
                self.items.popleft()
                self._settle(len(message))
            if time.perf_counter() - since > SLICE:
                await asyncio.sleep(0)
                since = time.perf_counter()

    def _check_stall(self, now: float) -> None:
        if self.sending_since is not None and now - self.sending_since >= self.stall and self.stalled is not None:
            stalled, self.stalled = self.stalled, None  # once
            stalled()


async def heartbeats(interval: float) -> None:
    """Every `interval` seconds, a HEARTBEAT into each outbox that queued nothing meanwhile
    (WebSocket ping, SSE comment line): idle connections stay open through proxies. Every
    `_TICK`, the sends under way that have not returned for their outbox's `stall` seconds
    (only those outboxes are looked at)."""
    beat = time.monotonic()
    while True:
        await asyncio.sleep(min(interval, _TICK))
        now = time.monotonic()
        for outbox in list(_SENDING):
            outbox._check_stall(now)
        if now - beat >= interval:
            beat = now
            quiet = now - interval
            for outbox in list(_OPEN):
                if outbox.last <= quiet and not outbox.items:
                    outbox.put(HEARTBEAT)
