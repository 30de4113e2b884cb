"""Single-flight (ARCHITECTURE.md, "Plan, then execute"): identical upstream reads in flight at the same moment, from
concurrent GraphQL requests, share one call. Only reads go through here, and the key
carries the caller's scope for private data, so nothing private is shared across callers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

__all__ = ["SingleFlight"]


class SingleFlight:
    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Future[Any]] = {}

    async def do(self, key: Hashable, call: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """`call()`'s result, and whether it came from a flight another request started."""
        flight = self._calls.get(key)
        joined = flight is not None
        if flight is None:
            flight = self._calls[key] = asyncio.ensure_future(call())
            flight.add_done_callback(lambda _: self._calls.pop(key, None))
        # A waiter that gives up (its deadline, a client gone) must not cancel the call the
        # others are waiting for.
        return await asyncio.shield(flight), joined
