"""Following the services' change feeds (ARCHITECTURE.md, "Versioned cache"): each gateway instance long-polls
every service's `/events` and raises the version floor of each changed entity in L1 and
L2, so a change is served fresh within one feed round trip, not after a TTL.

The cursor is kept in Redis beside the entries it protects, so a restart resumes where
the instances left off. With memory only there is nothing to resume: a new process
starts with an empty cache, so it starts at the feed's head. A gap (the feed's head is
behind our cursor, or a page is not the seqs right after it, with a hole anywhere) drops
that service's entries; a feed that cannot be read makes them untrusted, so they are
revalidated before being served as fresh. An instance is ready once each feed has caught up
with the head it had at the start (`following`).

An entity cached under another entity's key (a payment under its order's id) is found by
the key its events carry (`orderId`), and its slot is ordered by feed position rather than
by version: several payments can answer for one order over time (a declined one, then a new
one), so only the feed says which answer is newer. The cursor saved in Redis never runs
ahead of the floor raises Redis holds: while some wait to be re-applied (Redis was away),
it is not moved, so an instance resuming from it re-applies them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from .cache import EntityCache, RedisUnavailable
from .errors import UpstreamError
from .upstream import Upstream

__all__ = ["FeedFollower", "FeedListener"]

log = logging.getLogger("bookvault.feed")


class FeedListener(Protocol):
    """Told of every page of a service's events once the cache has applied it (live
    updates, gateway/hub.py). Called on the follower's task: it must not block or raise;
    it queues the work and returns."""

    def changed(self, service: str, events: Sequence[Mapping[str, Any]]) -> None: ...

    def lost(self, service: str) -> None:
        """A gap in the feed: any of the service's entities may have changed unannounced."""


def _continuous(events: Sequence[Mapping[str, Any]], cursor: int, following: int) -> bool:
    """The page is the seqs right after `cursor`, with none left out, and `next` is its last:
    a hole anywhere in it is a gap, not only before its first event (the services number their
    events densely in commit order, so a hole means events this page does not show; issue 24)."""
    seqs = [event.get("seq") if isinstance(event, Mapping) else None for event in events]
    return seqs == list(range(cursor + 1, cursor + 1 + len(seqs))) and following == cursor + len(seqs)


class FeedFollower:
    def __init__(
        self,
        upstream: Upstream,
        cache: EntityCache,
        entities: Mapping[str, list[str]],
        keep: Mapping[str, float],
        wait: float = 10.0,
        feed_keys: Mapping[str, str] | None = None,
        derived: Mapping[str, Sequence[tuple[str, str]]] | None = None,
        listeners: Sequence[FeedListener] = (),
    ) -> None:
        self.upstream = upstream
        self.cache = cache
        self.entities = entities  # service -> entity types it owns
        self.keep = keep  # entity -> seconds an announced version floor is kept
        self.wait = wait
        # entity -> the event field naming its cache key, for entities cached under another's
        # key (payment -> "orderId"); their floors are feed seqs (README, "The versioned cache").
        self.feed_keys = dict(feed_keys or {})
        # event entity -> (entity, event field) cached from it: "order" -> ("orderPage",
        # "customerId"); their floors are feed seqs too.
        self.derived = {entity: tuple(pairs) for entity, pairs in (derived or {}).items()}
        self.listeners = tuple(listeners)
        self.cursors: dict[str, int] = {}
        # The head each feed had when it was started: until the cursor reaches it, the cache
        # may hold entries of changes made while no instance followed (`following`).
        self.heads: dict[str, int] = {}
        self._failing: set[str] = set()  # feeds whose last read failed: their entries are distrusted
        self._advanced = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(s), name=f"feed:{s}") for s in self.entities]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def following(self, service: str) -> Callable[[], Awaitable[bool]]:
        """A readiness check: has `service`'s feed caught up with the head it had when this
        instance started? Before that, an entry in Redis can be of a change made while every
        instance was down, whose event is still to be applied: a restarted gateway served a
        book's old title once in 2 of 23 restarts while it said it was ready (issue 24). A
        feed that cannot be read passes: its entries are distrusted (revalidated before being
        served as fresh) for as long as it fails, so it holds no such window."""

        async def check() -> bool:
            if service in self._failing:
                return True
            head = self.heads.get(service)
            return head is not None and self.cursors.get(service, -1) >= head

        return check

    async def started(self) -> None:
        """Wait until every feed has a cursor (and any untrusted Redis entries are dropped)."""
        async with self._advanced:
            await self._advanced.wait_for(lambda: set(self.cursors) >= set(self.entities))

    async def settled(self) -> None:
        """Wait until Redis holds every floor raise the cache queued while it was away: each
        feed page tries to apply them before its cursor is saved (`_advance`), so an idle
        instance gets there within a long-poll's wait."""
        async with self._advanced:
            await self._advanced.wait_for(lambda: self.cache.settled)

    async def reached(self, service: str, seq: int) -> None:
        """Wait until `service`'s events up to `seq` have been applied."""
        async with self._advanced:
            await self._advanced.wait_for(lambda: self.cursors.get(service, -1) >= seq)

    async def _read(self, service: str, after: int, wait: float) -> tuple[list[dict[str, Any]], int, int]:
        """The events after `after` (waiting up to `wait` for a first one), the seq to read on
        from, and the head; UpstreamError: the feed cannot be read now."""
        page = await self.upstream.poll(service, f"/events?after={after}&limit=500&wait={wait:g}", timeout=wait + 5)
        try:
            return list(page["events"]), int(page["next"]), int(page["latest"])
        except (KeyError, TypeError, ValueError):
            raise UpstreamError(f"{service} sent a feed page not in its contract", service=service) from None

    async def _follow(self, service: str) -> None:
        cursor: int | None = None
        delay, healthy = 0.2, True
        while True:
            try:
                if cursor is None:
                    cursor = await self._start_cursor(service)
                events, following, latest = await self._read(service, cursor, self.wait)
            except UpstreamError as exc:
                if healthy:
                    log.warning("cannot read the %s change feed, its cached entries will be revalidated: %s", service, exc)
                    healthy = False
                self.cache.distrust(service)
                self._failing.add(service)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay, healthy = 0.2, True
            self._failing.discard(service)
            if latest < cursor or not _continuous(events, cursor, following):
                log.warning("gap in the %s change feed (cursor %s, head %s): dropping its cached entries",
                            service, cursor, latest)
                await self.cache.drop(service, self.entities[service])
                if latest < cursor:  # the service's feed was reset: start again at its head
                    following = latest
                self._tell(lambda listener: listener.lost(service))
            await self.cache.invalidate_many(self._changes(events))
            await self._advance(service, following)
            cursor = following
            if events:
                self._tell(lambda listener: listener.changed(service, events))

    def _tell(self, call: Callable[[FeedListener], None]) -> None:
        """After the cache (a listener's read sees the raised floors); a failing listener
        is logged and never stops the feed."""
        for listener in self.listeners:
            try:
                call(listener)
            except Exception:
                log.exception("a change-feed listener failed")

    def _changes(self, events: list[dict[str, Any]]) -> list[tuple[str, int, int, float]]:
        """(entity, cache key, floor, seconds kept) per event; an event outside the contract
        or without the key its entity is cached under changes nothing (its TTL still holds)."""
        out = []
        for event in events:
            entity = event.get("entity") if isinstance(event, dict) else None
            if not isinstance(entity, str):
                continue
            keep = self.keep.get(entity)
            field = self.feed_keys.get(entity)
            key, floor = (event.get("id"), event.get("version")) if field is None else (event.get(field), event.get("seq"))
            if keep is not None and isinstance(key, int) and isinstance(floor, int):
                out.append((entity, key, floor, keep))
            for derived, field in self.derived.get(entity, ()):
                key, floor, keep = event.get(field), event.get("seq"), self.keep.get(derived)
                if keep is not None and isinstance(key, int) and isinstance(floor, int):
                    out.append((derived, key, floor, keep))
        return out

    async def _head(self, service: str) -> int:
        """The seq of the service's last event (gateway/events.py reads it from the broker)."""
        _, _, latest = await self._read(service, 0, 0)
        return latest

    async def _start_cursor(self, service: str) -> int:
        latest = await self._head(service)
        saved = None
        if self.cache.redis is not None:
            try:
                saved = await self.cache.redis.cursor(self._cursor_key(service))
            except RedisUnavailable:
                saved = None
            if saved is None or saved > latest:
                # Entries in Redis with no cursor to vouch for them may have missed changes.
                await self.cache.drop(service, self.entities[service])
        start = latest if saved is None or saved > latest else saved
        self.heads[service] = latest
        await self._advance(service, start)
        return start

    async def _advance(self, service: str, seq: int) -> None:
        if self.cache.redis is not None and await self.cache.repair():
            try:
                await self.cache.redis.advance(self._cursor_key(service), seq)
            except RedisUnavailable:
                pass
        async with self._advanced:
            self.cursors[service] = seq
            self._advanced.notify_all()

    def _cursor_key(self, service: str) -> str:
        return self.cache.key("feed", service)
