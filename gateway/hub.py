"""The live hub (ARCHITECTURE.md, "Live updates"): one per instance, fed by the instance's
change-feed follower (a `FeedListener`), fanning each change out to every subscription.

- Changes are gathered while a round runs, so a burst becomes few rounds; a round makes
  one batched read of the changed entities through the entity source (cache, versions,
  single-flight apply), shared by every subscriber: never a call per subscriber.
- Per change, the payload is shaped once per group (same document and variables) with
  the planned engine, over that shared read, and serialized once.
- Each subscription remembers the versions it was sent per entity (the entity's and those
  of the related entities its selection reads): a change that brings nothing newer is
  not sent, so versions only go forward, without duplicates.
- Who may see what is checked on every message, as for a query: the entity's owner or staff.
- A subscriber's transport takes a message or says it cannot (its queue is full): it is
  then dropped, never buffered without bound.
- Fair (issue 25): the work of first states and of rounds is cut into pieces (a
  subscription's admission, one entity's payload), at most `PIECES` of them started per turn
  of the event loop, the waiting ones let go in turn per caller (`Turns`; rounds first). A first state's next message waits until its connection and its
  caller have room (`Sink.room`: messages in flight, gateway/outbox.py), so it goes out as
  fast as the client reads it and no faster."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from graphql import GraphQLSchema

from .auth import Caller
from .errors import Forbidden, GatewayError, Unauthenticated
from .execute import Fetched, execute_plan
from .live import Feed, Live
from .outbox import Budget
from .resilience import Deadline
from .source import Binding, EntitySource, Reader, Stale
from .errors import format_errors

__all__ = ["LiveHub", "Sink", "Subscription", "TooManySubscriptions", "Turns", "expires_in"]

log = logging.getLogger("bookvault.live")
# The hub reads as itself, with staff's reach: private entries it caches are its own
# scope, and what it read reaches a subscriber only after the owner check below.
HUB_CALLER = Caller("bookvault-live-hub", scopes=frozenset({"staff"}), staff=True)
# Pieces of live work (an admission, one entity's payload) started per turn of the event
# loop: each is ~0.02-0.5 ms of CPU (bench/live_bench.py), so a turn holds the loop a few ms.
PIECES = 16


def expires_in(caller: Caller | None, leeway: float) -> float | None:
    """Seconds until `caller`'s rights end: its token's `exp` plus the leeway a token is
    still accepted with (RFC 7519 §4.1.4); None for anonymous callers (public data only)."""
    if caller is None or caller.expires is None:
        return None
    return caller.expires + leeway - time.time()


class Turns:
    """At most `pieces` pieces of live work started per turn of the event loop (what a turn
    runs is what was ready when it began: a piece that ends without waiting would otherwise
    let the next one start in the same turn, and a thousand of them hold the loop). Past
    that, a piece waits for the next turn; waiting pieces are let go in turn per caller
    (round robin: a caller with 500 subscriptions waits behind another caller's one, not
    the other way round), `urgent` ones first (rounds, which serve everyone)."""

    def __init__(self, pieces: int = PIECES) -> None:
        self.pieces = pieces
        self.started = 0  # pieces started in this turn
        self.next_turn: asyncio.Handle | None = None  # when the count starts again
        self.urgent: deque[asyncio.Future[None]] = deque()
        self.queues: dict[Hashable, deque[asyncio.Future[None]]] = {}  # in turn order

    async def take(self, who: Hashable, urgent: bool = False) -> None:
        """Until this piece may start (at once when the turn has room and nobody waits)."""
        if self.started < self.pieces and not self.urgent and not self.queues:
            self._count(1)
            return
        waiter = asyncio.get_running_loop().create_future()
        if urgent:
            self.urgent.append(waiter)
        else:
            self.queues.setdefault(who, deque()).append(waiter)
        self._count(0)
        await waiter

    def _count(self, pieces: int) -> None:
        self.started += pieces
        if self.next_turn is None:  # call_soon: runs in the loop's next turn, after it polled
            self.next_turn = asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        """A new turn: the count starts again with the waiting pieces let go, in turn."""
        self.next_turn, self.started = None, 0
        while self.started < self.pieces and (self.urgent or self.queues):
            if self.urgent:
                waiter = self.urgent.popleft()
            else:
                who = next(iter(self.queues))
                queue = self.queues.pop(who)
                waiter = queue.popleft()
                if queue:
                    self.queues[who] = queue  # to the back of the turn order
            if not waiter.done():  # not cancelled meanwhile
                waiter.set_result(None)
                self._count(1)


class TooManySubscriptions(GatewayError):
    code = "TOO_MANY_SUBSCRIPTIONS"


class Sink(Protocol):
    """Where one subscription's messages go (a WebSocket's or an SSE stream's queue)."""

    def next(self, payload: bytes) -> bool:
        """Queue `payload` (a serialized execution result); False: the queue is full (a slow
        consumer). A transport that is closing anyway takes it (True) and never sends it."""

    def end(self, error: GatewayError | None) -> None:
        """The hub ends the subscription: an error (FORBIDDEN...), or None when the gateway stops."""

    async def room(self) -> bool:
        """Until the transport can take one more first-state message (its connection and
        its caller have few enough messages in flight): True; False once it is closing."""

    def full(self) -> bool:
        """Whether a first-state message would have to wait now (what `room` waits out)."""

    @property
    def slow(self) -> bool:
        """Whether the transport dropped this subscription's client as a slow consumer."""

    async def closed(self) -> None:
        """Until the transport has sent what `end` queued and closed (1001, `complete`)."""


@dataclass(eq=False)
class Subscription:
    feed: Feed
    caller: Caller | None
    sink: Sink
    sent: dict[int, tuple[int, ...]] = field(default_factory=dict)  # entity key -> versions sent
    active: bool = True  # until it leaves the hub

    def allowed(self, owner: Any) -> bool:
        return self.caller is not None and self.caller.owns(owner)


@dataclass(eq=False)
class _Group:
    feed: Feed  # the first subscriber's; the others' have the same document and variables
    subscriptions: set[Subscription] = field(default_factory=set)


class LiveHub:
    def __init__(self, schema: GraphQLSchema, source: EntitySource, lives: Iterable[Live], *,
                 limit: int = 10_000, deadline: float = 2.0) -> None:
        self.schema = schema
        self.source = source
        self.limit = limit
        self.deadline = deadline
        self.count = 0  # subscriptions held; these counts are /metrics' (gateway/metrics.py)
        self.rounds = 0
        self.sent = 0
        self.dropped = 0  # slow consumers' subscriptions
        self.expired = 0  # subscriptions ended because their caller's token expired (the transports count)
        self.pings_dropped = 0  # client pings not answered: past the rate (gateway/live_ws.py counts)
        self.turns = Turns()
        self._budgets: weakref.WeakValueDictionary[str, Budget] = weakref.WeakValueDictionary()
        self._bindings: dict[str, Binding] = {}
        self._owner: dict[str, str] = {}  # entity -> the attribute naming its owning customer
        self._watch: dict[str, tuple[str, str]] = {}  # event entity -> (followed entity, event field of its key)
        for live in lives:
            entity = live.binding.entity
            self._bindings[entity], self._owner[entity] = live.binding, live.owner
            self._watch[entity] = (entity, "id")
            for related in live.related:
                self._watch[related.entity] = (entity, related.feed_key or "id")
        self._services = {b.service for b in self._bindings.values()} | {
            b.service for live in lives for b in live.related}
        self._groups: dict[tuple[Any, ...], _Group] = {}
        self._by_key: dict[str, dict[int, set[_Group]]] = {e: {} for e in self._bindings}
        self._by_owner: dict[str, dict[Any, set[_Group]]] = {e: {} for e in self._bindings}
        self._pending: dict[str, dict[int, None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the feed's listener -----------------------------------------------------------------

    def changed(self, service: str, events: Sequence[Mapping[str, Any]]) -> None:
        for event in events:
            rule = self._watch.get(event.get("entity"))  # type: ignore[arg-type]
            key = event.get(rule[1]) if rule is not None else None
            if rule is not None and isinstance(key, int):
                keys = self._pending.setdefault(rule[0], {})
                keys.pop(key, None)  # in the order of each key's latest change
                keys[key] = None
        if self._pending:
            self._wake.set()

    def lost(self, service: str) -> None:
        """A gap in a feed: every entity followed may have changed; read them all again."""
        if service not in self._services:
            return
        for entity in self._bindings:
            keys = self._pending.setdefault(entity, {})
            keys.update(dict.fromkeys(self._by_key[entity]))
            for group in self._groups.values():
                for subscription in group.subscriptions:
                    keys.update(dict.fromkeys(subscription.sent))
        self._wake.set()

    # -- subscribing -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="live-hub")

    async def subscribe(self, feed: Feed, caller: Caller | None, sink: Sink) -> Subscription:
        """Follow `feed` for `caller`; the current state is queued at once. Raises
        UNAUTHENTICATED, FORBIDDEN, NOT_FOUND, TOO_MANY_SUBSCRIPTIONS or an upstream error."""
        binding = feed.live.binding
        policy = self.source.policy(binding)
        if caller is None and (policy is None or policy.private):
            raise Unauthenticated(f"sign in to follow {binding.entity}s (a bearer token)")
        if feed.key is None and (caller is None or caller.customer_id is None):
            raise Forbidden(f"this token names no customer whose {binding.entity}s could be followed")
        if self.count >= self.limit:
            raise TooManySubscriptions(f"this instance follows {self.limit} subscriptions already; try another")
        subscription = Subscription(feed, caller, sink)
        self._add(subscription)
        try:
            if feed.key is not None:
                await self._current(subscription, [feed.key])
            elif feed.live.current is not None:
                await self._current(subscription, await feed.live.current(self._reader(), caller.customer_id))  # type: ignore[union-attr]
        except BaseException:  # refused, or cancelled (its connection closed: a slow consumer's counts)
            (self.drop if sink.slow else self.leave)(subscription)
            raise
        return subscription

    def budget(self, caller: Caller, limit: int) -> Budget:
        """`caller`'s messages in flight across its connections (shared by its outboxes)."""
        budget = self._budgets.get(caller.key)
        if budget is None:
            budget = self._budgets[caller.key] = Budget(limit)
        return budget

    def drop(self, subscription: Subscription) -> None:
        """A slow consumer's subscription: it leaves, counted (its transport closes it)."""
        if subscription.active:
            self.dropped += 1
        self.leave(subscription)

    def leave(self, subscription: Subscription) -> None:
        subscription.active = False
        group = self._groups.get(self._group_id(subscription))
        if group is None or subscription not in group.subscriptions:
            return
        group.subscriptions.discard(subscription)
        self.count -= 1
        if not group.subscriptions:
            del self._groups[self._group_id(subscription)]
            entity, feed = subscription.feed.live.binding.entity, subscription.feed
            index, at = (self._by_key[entity], feed.key) if feed.key is not None else (
                self._by_owner[entity], subscription.caller.customer_id)  # type: ignore[union-attr]
            index[at].discard(group)
            if not index[at]:
                del index[at]

    async def close(self, wait: float = 2.0) -> None:
        """The gateway stops: every subscription ends (WebSocket 1001, SSE complete), and the
        transports are given `wait` seconds to say so before the server closes connections."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        sinks = []
        for group in list(self._groups.values()):
            for subscription in list(group.subscriptions):
                self.leave(subscription)
                subscription.sink.end(None)
                sinks.append(subscription.sink)
        if sinks:
            await asyncio.wait([asyncio.ensure_future(sink.closed()) for sink in sinks], timeout=wait)

    def _group_id(self, subscription: Subscription) -> tuple[Any, ...]:
        feed = subscription.feed
        return feed.group if feed.key is not None else (*feed.group, subscription.caller.customer_id)  # type: ignore[union-attr]

    def _add(self, subscription: Subscription) -> None:
        group_id = self._group_id(subscription)
        group = self._groups.get(group_id)
        if group is None:
            group = self._groups[group_id] = _Group(subscription.feed)
            entity, feed = subscription.feed.live.binding.entity, subscription.feed
            if feed.key is not None:
                self._by_key[entity].setdefault(feed.key, set()).add(group)
            else:
                self._by_owner[entity].setdefault(subscription.caller.customer_id, set()).add(group)  # type: ignore[union-attr]
        group.subscriptions.add(subscription)
        self.count += 1

    # -- rounds ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            for entity, keys in pending.items():
                try:
                    await self._round(self._bindings[entity], list(keys))
                except Exception:
                    log.exception("a live update round failed")
            self.rounds += 1

    def _reader(self) -> Reader:
        return self.source.reader(HUB_CALLER, Deadline(self.deadline))

    async def _round(self, binding: Binding, keys: list[int]) -> None:
        followed, owners = self._by_key[binding.entity], self._by_owner[binding.entity]
        wanted = keys if owners else [k for k in keys if k in followed]
        if not wanted:
            return
        reader = self._reader()
        found = await reader.read(binding, wanted)  # the one read of this round, for everyone
        fetched: Fetched = {id(binding): dict(found)}
        work = []
        for key in wanted:
            value = _value(found.get(key))
            if value is None:
                continue  # gone or unreadable now: nothing new to show; the next change reads again
            owner = getattr(value, self._owner[binding.entity])
            for group in (*followed.get(key, ()), *owners.get(owner, ())):
                work.append((group, key, owner))
        shaped = await asyncio.gather(*(self._shape_in_turn(g.feed, k, fetched, reader) for g, k, _ in work),
                                      return_exceptions=True)
        for (group, key, owner), result in zip(work, shaped):
            if isinstance(result, BaseException):  # a bug: the other groups are still served
                log.error("shaping a live update failed", exc_info=result)
                continue
            payload, versions = result
            for subscription in list(group.subscriptions):
                self._deliver(subscription, key, owner, payload, versions)

    async def _current(self, subscription: Subscription, keys: list[int]) -> None:
        """The first messages: the entity followed (its error raised: NOT_FOUND, FORBIDDEN...),
        or the caller's entities `Live.current` names (those unreadable now are left out)."""
        binding = subscription.feed.live.binding
        reader = self._reader()
        found = await reader.read(binding, keys)
        fetched: Fetched = {id(binding): dict(found)}
        who = subscription.caller.key if subscription.caller is not None else None
        for key in keys:
            value = found[key]
            if isinstance(value, Exception):
                if subscription.feed.key is None:
                    continue
                raise value
            owner = getattr(_value(value), self._owner[binding.entity])
            if not subscription.allowed(owner):
                if subscription.feed.key is None:
                    continue
                raise Forbidden(f"{binding.entity} {key} is not yours to follow")
            # As fast as the client reads, not ahead of it; nothing more once it is closing.
            while True:
                if not await subscription.sink.room() or not subscription.active:
                    return
                await self.turns.take(who)
                if not subscription.sink.full():  # others may have filled it while this waited its turn
                    break
            payload, versions = await self._shape(subscription.feed, key, fetched, reader)
            if subscription.active:
                self._deliver(subscription, key, owner, payload, versions)

    async def _shape_in_turn(self, feed: Feed, key: int, fetched: Fetched, reader: Reader
                             ) -> tuple[bytes, tuple[int, ...]]:
        await self.turns.take(None, urgent=True)
        return await self._shape(feed, key, fetched, reader)

    async def _shape(self, feed: Feed, key: int, fetched: Fetched, reader: Reader) -> tuple[bytes, tuple[int, ...]]:
        data, errors, _ = await execute_plan(feed.plan, feed.variables_for(self.schema, key), reader, fetched)
        body: dict[str, Any] = {"data": data}
        if errors:
            body["errors"] = format_errors(errors)
        versions = (_version(fetched[id(feed.live.binding)].get(key)),
                    *(_version(fetched.get(id(b), {}).get(key)) for b in feed.watched))
        return orjson.dumps(body), versions

    def _deliver(self, subscription: Subscription, key: int, owner: Any, payload: bytes,
                 versions: tuple[int, ...]) -> None:
        if not subscription.allowed(owner):
            self.leave(subscription)
            subscription.sink.end(Forbidden(f"{subscription.feed.live.binding.entity} {key} is not yours to follow"))
            return
        last = subscription.sent.get(key)
        if last is not None and all(v <= s for v, s in zip(versions, last)):
            return  # nothing newer than what it was sent: a duplicate or a late answer
        subscription.sent[key] = versions if last is None else tuple(map(max, versions, last))
        if subscription.sink.next(payload):
            self.sent += 1
        else:
            self.drop(subscription)  # a slow consumer: its transport closes it


def _value(found: Any) -> Any:
    """An entity as read (stale data is still data); None for an error or nothing."""
    if isinstance(found, Stale):
        return found.value
    return None if isinstance(found, Exception) else found


def _version(found: Any) -> int:
    version = getattr(_value(found), "version", 0)
    return version if isinstance(version, int) else 0
