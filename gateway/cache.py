"""The versioned entity cache (ARCHITECTURE.md, "Versioned cache"): L1 in process, L2 in Redis when configured.

An entity's key holds a *slot*: a version floor (the newest version the change feed has
announced) and one entry per scope ("public", or a caller's identity hash for private
data). A write is applied only if it is not older than what the slot holds, atomically:
by compare-and-set in L1 and by a Lua script in Redis. So a slow response carrying
version 2 that lands after version 3 (or after the event announcing 3) changes nothing.

Redis trouble never fails a request: every call has a short timeout, a failure is
counted, and Redis is left alone for a moment before it is tried again. A floor raise
that could not reach Redis is queued (bounded) and applied when Redis answers again, and
an L2 entry older than the floor this instance holds in L1 is never served: Redis being
away for a while never brings an old version back (ARCHITECTURE.md, "Versioned cache").

Floor raises are also published on a Redis channel per namespace, so every instance's L1
learns of a change from whichever instance applied it first, not only from its own feed
follower.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from aiocache import RedisCache, SimpleMemoryCache
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .metrics import record_cache

__all__ = ["CachePolicy", "Entry", "EntityCache", "MemoryLevel", "RedisLevel", "FORMAT"]

log = logging.getLogger("bookvault.cache")
# Bumped whenever the cached payload's shape changes, so a new release never reads
# entries an old one wrote (ARCHITECTURE.md, "Versioned cache").
FORMAT = "c2"
Clock = Callable[[], float]


@dataclass(frozen=True)
class CachePolicy:
    ttl: float  # seconds an entry is served without asking the service
    max_stale: float  # seconds past the TTL it may still be served when the service fails
    private: bool = False  # cached per caller identity, never for anonymous callers


@dataclass(frozen=True)
class Entry:
    payload: dict[str, Any] | None  # None: the service said there is none (optional relations)
    version: int
    fetched_at: float
    service: str
    # The payload parsed into its GraphQL type, made on first use and kept with the entry in
    # L1, so a warm read does not parse the same payload again. Read-only for its users.
    parsed: Any = field(default=None, compare=False, repr=False)
    # The service's feed position when the payload was read (its `X-Feed-Seq`; 0: unknown):
    # the payload reflects every change up to it. Consistency tokens are made of these.
    seq: int = 0

    def parse(self, parse: Callable[[dict[str, Any]], Any]) -> Any:
        if self.parsed is None:
            object.__setattr__(self, "parsed", parse(self.payload))  # type: ignore[arg-type]
        return self.parsed

    def dumps(self) -> str:
        return json.dumps({"payload": self.payload, "version": self.version, "fetchedAt": self.fetched_at,
                           "service": self.service, "seq": self.seq}, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> Entry:
        d = json.loads(raw)
        return cls(d["payload"], int(d["version"]), float(d["fetchedAt"]), d["service"], seq=int(d.get("seq", 0)))

    def supersedes(self, other: Entry | None) -> bool:
        """Newer version, or the same version fetched later (a revalidation)."""
        return other is None or (self.version, self.fetched_at) > (other.version, other.fetched_at)


@dataclass(frozen=True)
class Slot:
    floor: int = 0
    entries: dict[str, Entry] = field(default_factory=dict)


class MemoryLevel:
    """L1: aiocache's memory cache, bounded in keys (oldest written out first).

    Slots are immutable; a write is a compare-and-set on the slot it read
    (aiocache's ``_cas_token``), retried when another task wrote in between.

    It calls the backend's own methods (``_multi_get``, ``_get``, ``_add``, ``_set``: the
    hooks aiocache's public API wraps) because the wrappers' timeout, plugin and
    key-building layers cost more than the lookup itself, on every entity of every request."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._cache = _BoundedMemoryCache(max_keys)

    async def get_many(self, keys: list[str], scope: str) -> tuple[list[Entry | None], list[int]]:
        """Each key's visible entry, and its version floor (0: none known)."""
        slots: list[Slot | None] = await self._cache._multi_get(keys)
        return [_visible(slot, scope) for slot in slots], [slot.floor if slot else 0 for slot in slots]

    def peek_fresh(self, prefix: str, ids: list[Any], scope: str, since: float, trusted: float) -> list[Entry] | None:
        """The visible entry of each id's key (`prefix` + id), when every one was fetched after
        `since` and at or after `trusted`; None at the first that was not. Synchronous: the
        backend's own dict (what ``_multi_get`` reads), so a warm read needs no await. One
        loop, `_visible` and `EntityCache.fresh` inline: this runs for every entity of a warm
        query."""
        stored, out = self._cache._cache, []
        for i in ids:
            slot = stored.get(f"{prefix}{i}")
            if slot is None:
                return None
            entry = slot.entries.get(scope)
            if entry is None or entry.version < slot.floor or entry.fetched_at <= since or entry.fetched_at < trusted:
                return None
            out.append(entry)
        return out

    async def put(self, key: str, scope: str, entry: Entry, ttl: float) -> bool:
        return await self._update(key, ttl, lambda slot: _with_entry(slot, scope, entry))

    async def invalidate(self, key: str, version: int, ttl: float) -> None:
        await self._update(key, ttl, lambda slot: _with_floor(slot, version))

    async def evict(self, key: str, ttl: float) -> None:
        await self._update(key, ttl, lambda slot: Slot(slot.floor) if slot.entries else None)

    async def drop_prefix(self, prefix: str) -> None:
        await self._cache.clear(namespace=prefix)

    async def _update(self, key: str, ttl: float, change: Callable[[Slot], Slot | None]) -> bool:
        while True:
            old: Slot | None = await self._cache._get(key)
            new = change(old or Slot())
            if new is None:
                return False
            if old is None:
                try:
                    await self._cache._add(key, new, ttl=ttl)
                    return True
                except ValueError:  # another task created it first: read again
                    continue
            if await self._cache._set(key, new, ttl=ttl, _cas_token=old):
                return True


class _BoundedMemoryCache(SimpleMemoryCache):
    def __init__(self, max_keys: int) -> None:
        super().__init__(timeout=None)
        self.max_keys = max_keys

    async def _set(self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None) -> Any:
        fresh_key = key not in self._cache
        done = await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)
        if done and fresh_key:
            while len(self._cache) > self.max_keys:
                await self._delete(next(iter(self._cache)))
        return done


def _visible(slot: Slot | None, scope: str) -> Entry | None:
    entry = slot.entries.get(scope) if slot else None
    return entry if entry is not None and entry.version >= slot.floor else None  # type: ignore[union-attr]


def _with_entry(slot: Slot, scope: str, entry: Entry) -> Slot | None:
    if entry.version < slot.floor or not entry.supersedes(slot.entries.get(scope)):
        return None
    return replace(slot, entries={**slot.entries, scope: entry})


def _with_floor(slot: Slot, version: int) -> Slot | None:
    if version <= slot.floor:
        return None
    return Slot(version, {s: e for s, e in slot.entries.items() if e.version >= version})


# KEYS[i]: slot hashes; ARGV[1]: scope. An entry older than the slot's floor is not returned.
_READ = """
local out = {}
for i, key in ipairs(KEYS) do
  local r = redis.call('HMGET', key, ARGV[1], '_floor')
  local e = r[1]
  if e and r[2] and cjson.decode(e).version < tonumber(r[2]) then e = false end
  out[i] = e or false
end
return out
"""
# KEYS: slots; ARGV: scope, expiry ms, then per key: entry json, version, fetchedAt.
# Each is applied only if not older than the slot's floor and newer than the scope's
# entry: a compare-and-set, atomic because a script runs alone.
_PUT = """
local applied = 0
for i, key in ipairs(KEYS) do
  local json, version, fetched = ARGV[i * 3], tonumber(ARGV[i * 3 + 1]), tonumber(ARGV[i * 3 + 2])
  local ok = version >= tonumber(redis.call('HGET', key, '_floor') or '0')
  local cur = redis.call('HGET', key, ARGV[1])
  if ok and cur then
    local e = cjson.decode(cur)
    ok = e.version < version or (e.version == version and e.fetchedAt < fetched)
  end
  if ok then
    redis.call('HSET', key, ARGV[1], json)
    redis.call('PEXPIRE', key, ARGV[2])
    applied = applied + 1
  end
end
return applied
"""
# KEYS: slots; ARGV: channel ('' for none), origin, then per key: announced version, expiry
# ms. Raises each floor, drops older entries, and publishes the floors it raised (one
# message), so other instances raise theirs in L1 without waiting for their own follower.
_INVALIDATE = """
local raised = {}
for i, key in ipairs(KEYS) do
  local version, expiry = tonumber(ARGV[i * 2 + 1]), tonumber(ARGV[i * 2 + 2])
  if version > tonumber(redis.call('HGET', key, '_floor') or '0') then
    local all = redis.call('HGETALL', key)
    for j = 1, #all, 2 do
      if all[j] ~= '_floor' and cjson.decode(all[j + 1]).version < version then redis.call('HDEL', key, all[j]) end
    end
    redis.call('HSET', key, '_floor', version)
    redis.call('PEXPIRE', key, expiry)
    raised[#raised + 1] = {key, version, expiry}
  end
end
if #raised > 0 and ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], cjson.encode({o = ARGV[2], r = raised})) end
return #raised
"""
# KEYS: slots. Drops every scope's entry and keeps the floor: whatever was missed, a floor
# only holds back versions older than one already announced, so it stays true. Dropping it
# would let a read that was in flight write an older version back over the change.
_EVICT = """
for _, key in ipairs(KEYS) do
  local all = redis.call('HKEYS', key)
  for i = 1, #all do
    if all[i] ~= '_floor' then redis.call('HDEL', key, all[i]) end
  end
end
return #KEYS
"""
# KEYS[1]: a feed cursor; ARGV[1]: seq. Cursors only move forward.
_ADVANCE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
"""


class RedisUnavailable(Exception):
    """Redis failed or is resting after a failure; callers go on without it."""


class RedisLevel:
    """L2: Redis through aiocache's Redis backend, shared by every gateway instance."""

    def __init__(self, url: str, timeout: float = 0.05, rest: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.url = url
        self.timeout = timeout
        parts = urlsplit(url)
        db = int(parts.path.lstrip("/") or 0)
        # Every socket read and write is bounded by the limit itself, not by redis-py's
        # default (5 s), and nothing is retried: a cancelled call that does not unwind at
        # once still ends within the limit (`_call`, issue 25). aiocache's own timeout is off
        # (0): `_call` bounds the call without waiting for it to unwind.
        self._cache = RedisCache(endpoint=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db,
                                 password=parts.password, timeout=0, create_connection_timeout=timeout,
                                 connection_pool_kwargs={"socket_timeout": timeout, "retry": Retry(NoBackoff(), 0)})
        self._unwinding: set[asyncio.Future[Any]] = set()  # calls given up on, still closing their connection
        self.rest = rest
        self._clock = clock
        self._resting_until = 0.0
        self.fallbacks = 0
        self.up = True

    async def close(self) -> None:
        if self._unwinding:
            await asyncio.wait(self._unwinding, timeout=max(self.timeout, 0.1) * 4)
        await self._cache.close()

    def _give_up(self, call: asyncio.Future[Any]) -> None:
        """Cancel a call nobody waits for any more; it is kept until it has unwound (its
        outcome read, so that it is never reported as an exception nobody retrieved)."""
        if call.done():
            return
        call.cancel()
        self._unwinding.add(call)
        call.add_done_callback(self._unwound)

    def _unwound(self, call: asyncio.Future[Any]) -> None:
        self._unwinding.discard(call)
        if not call.cancelled():
            call.exception()  # read: a failure of a call nobody waits for is no news

    def resting(self) -> bool:
        return self._clock() < self._resting_until

    async def _call(self, command: str, *args: Any) -> Any:
        """One command, within the limit whatever the client does when cancelled.

        A request once waited 5.1 s on a paused Redis (issue 25): aiocache bounded the call
        with `asyncio.wait_for`, which cancels the call and then waits for it to unwind.
        redis-py writes a command under a `wait_for` of its own, and Python 3.11's `wait_for`
        drops a cancellation that arrives as its inner write completes (CPython gh-86296,
        fixed in 3.12): the call went on to read the answer for the socket timeout, redis-py's
        default 5 s. So the call runs as a task of its own that is given up on at the limit,
        not waited for; its sockets are bounded by the limit too, so it ends soon after."""
        if self._clock() < self._resting_until:
            raise RedisUnavailable("resting after a failure")
        call = asyncio.ensure_future(self._cache.raw(command, *args))
        try:
            done, _ = await asyncio.wait((call,), timeout=self.timeout)
            if not done:
                raise TimeoutError(f"no answer within {self.timeout * 1000:g} ms")
            result = call.result()
        except asyncio.CancelledError:
            self._give_up(call)
            raise
        except Exception as exc:  # redis.RedisError, OSError and the limit alike
            self._give_up(call)
            self.fallbacks += 1
            self._resting_until = self._clock() + self.rest
            if self.up:
                log.warning("redis unavailable, serving from memory and services: %r", exc)
            self.up = False
            raise RedisUnavailable(str(exc)) from exc
        if not self.up:
            log.warning("redis is back")
        self.up = True
        return result

    async def get_many(self, keys: list[str], scope: str) -> list[Entry | None]:
        raw = await self._call("eval", _READ, len(keys), *keys, scope)
        return [Entry.loads(r) if r else None for r in raw]

    async def put_many(self, items: dict[str, Entry], scope: str, ttl: float) -> int:
        args: list[Any] = [scope, int(ttl * 1000)]
        for entry in items.values():
            args += [entry.dumps(), entry.version, repr(entry.fetched_at)]
        return int(await self._call("eval", _PUT, len(items), *items, *args))

    async def invalidate_many(self, floors: dict[str, tuple[int, float]], channel: str = "", origin: str = "") -> int:
        """Raise each key's floor to its version (kept `ttl` seconds); publish the raised ones on `channel`."""
        args: list[Any] = [channel, origin]
        for version, ttl in floors.values():
            args += [version, int(ttl * 1000)]
        return int(await self._call("eval", _INVALIDATE, len(floors), *floors, *args))

    async def listen(self, channel: str, apply: Callable[[bytes], Awaitable[None]],
                     connected: Callable[[], Awaitable[None]]) -> None:
        """Apply every message published on `channel`, for ever: a subscription of its own
        (redis-py's pub/sub), made again after a failure; `connected` runs on each
        (re)subscription, when what was missed meanwhile can be caught up."""
        delay = 0.2
        while True:
            # No read timeout: an idle subscription waits (redis-py reads pub/sub messages
            # without one); connecting and writing are bounded, and nothing is retried.
            bound = max(self.timeout, 0.5)
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=bound, socket_timeout=bound,
                                             retry=Retry(NoBackoff(), 0))
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await asyncio.wait_for(pubsub.subscribe(channel), max(self.timeout, 0.5) * 4)
                    delay = 0.2
                    await connected()
                    async for message in pubsub.listen():
                        await apply(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis.RedisError, OSError, a timeout: subscribe again later
                log.debug("floor channel lost, subscribing again in %.1fs: %r", delay, exc)
            finally:
                await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def evict(self, key: str) -> None:
        await self._call("eval", _EVICT, 1, key)

    async def drop_prefix(self, prefix: str) -> None:
        """Evict every slot under `prefix`: their entries go, their floors stay."""
        cursor: Any = 0
        while True:
            cursor, keys = await self._call("scan", cursor, f"{prefix}*", 500)
            if keys:
                await self._call("eval", _EVICT, len(keys), *keys)
            if int(cursor) == 0:
                return

    async def cursor(self, key: str) -> int | None:
        raw = await self._call("get", key)
        return int(raw) if raw is not None else None

    async def advance(self, key: str, seq: int) -> None:
        await self._call("eval", _ADVANCE, 1, key, seq)

    async def ping(self) -> bool:
        try:
            return bool(await self._call("ping"))
        except RedisUnavailable:
            return False


class EntityCache:
    """L1, then L2, for (entity, id) in a scope; knows nothing of what the entities are."""

    def __init__(self, memory: MemoryLevel, redis: RedisLevel | None = None, clock: Clock = time.time,
                 namespace: str = "bv", max_pending: int = 10_000) -> None:
        self.namespace = namespace
        self.memory = memory
        self.redis = redis
        self.clock = clock
        # Entries fetched before this moment are not trusted as fresh: their service's
        # change feed could not be read since, so a change may have been missed.
        self._trusted_after: dict[str, float] = {}
        # Bumped by every change event and drop of an entity type: a read in flight from an
        # earlier epoch may carry an older version, so a newer request must not join it.
        self._epochs: dict[str, int] = {}
        # Floor raises Redis did not get (it was away): key -> (version, seconds kept),
        # applied when it answers again. Past `max_pending` keys, the entity types whose
        # raises were lost are dropped from Redis instead (`_lost`).
        self.max_pending = max_pending
        self._pending: dict[str, tuple[int, float]] = {}
        self._lost: set[str] = set()
        self._repairing = asyncio.Lock()
        self._repair_task: asyncio.Future[bool] | None = None  # a repair a request started (`get_many`)
        self.origin = uuid.uuid4().hex[:12]  # this instance, on the floor channel
        self.channel = f"{namespace}:{FORMAT}:floors"
        self.heard = 0  # floor raises learnt from other instances over the channel

    def epoch(self, entity: str) -> int:
        return self._epochs.get(entity, 0)

    def key(self, entity: str, entity_id: int | str) -> str:
        return f"{self.namespace}:{FORMAT}:{entity}:{entity_id}"

    def fresh(self, entry: Entry, policy: CachePolicy, now: float | None = None) -> bool:
        return ((self.clock() if now is None else now) - entry.fetched_at < policy.ttl
                and entry.fetched_at >= self._trusted_after.get(entry.service, float("-inf")))

    def usable_stale(self, entry: Entry, policy: CachePolicy) -> bool:
        return self.clock() - entry.fetched_at <= policy.ttl + policy.max_stale

    async def get_many(self, entity: str, scope: str, ids: list[int],
                       policy: CachePolicy) -> tuple[dict[int, Entry], set[int]]:
        """The newest entry each level holds, and the ids whose entry is fresh. Ids without a
        fresh entry in L1 are looked up in L2 too: another instance may have fetched them
        since. An L2 entry older than the floor L1 holds is never taken: Redis missed that
        raise (it was away), and is told again."""
        prefix = self.key(entity, "")
        keys = [f"{prefix}{i}" for i in ids]
        entries, floors = await self.memory.get_many(keys, scope)
        now = self.clock()
        found: dict[int, Entry] = {}
        fresh: set[int] = set()
        ask: list[tuple[int, str, int]] = []
        within_ttl = 0
        for i, key, floor, entry in zip(ids, keys, floors, entries, strict=True):
            if entry is not None:
                found[i] = entry
                if now - entry.fetched_at < policy.ttl:
                    within_ttl += 1
                    if self.fresh(entry, policy, now):
                        fresh.add(i)
                        continue
            ask.append((i, key, floor))
        if ids:  # lookups by result: `hit` (fresh), `expired` (found, past its TTL: revalidated), `miss`
            record_cache(entity, "l1", "hit", within_ttl)
            record_cache(entity, "l1", "expired", len(found) - within_ttl)
            record_cache(entity, "l1", "miss", len(ids) - len(found))
        if ask and self.redis is not None:
            try:
                remote = await self.redis.get_many([k for _, k, _ in ask], scope)
            except RedisUnavailable:
                remote = []
            self._count(entity, "l2", policy, [e for e in remote if e is not None], len(remote))
            keep = policy.ttl + policy.max_stale
            for (i, key, floor), entry in zip(ask, remote, strict=False):
                if entry is None:
                    continue
                if entry.version < floor:
                    self._pend(entity, key, floor, keep)
                elif entry.supersedes(found.get(i)):
                    await self.memory.put(key, scope, entry, keep)
                    found[i] = entry
                    if self.fresh(entry, policy):
                        fresh.add(i)
            if (self._pending or self._lost) and remote:
                self._repair_soon()  # Redis answers: what it missed goes now, not on this request's time
        return found, fresh

    def peek_many(self, entity: str, scope: str, ids: list[Any], policy: CachePolicy,
                  service: str, count: bool = True) -> list[Entry] | None:
        """Each id's entry when every one is fresh in L1, read without an await; None when
        any is not (that read goes through `get_many`, which counts it). A warm query's
        reads take this way: no task, no coroutine per read (ARCHITECTURE.md, "Plan, then
        execute"). `service`: the one whose entries these are, for `fresh`."""
        entries = self.memory.peek_fresh(self.key(entity, ""), ids, scope, self.clock() - policy.ttl,
                                         self._trusted_after.get(service, float("-inf")))
        if entries is not None and count:  # `count`: False to look without counting the lookups
            record_cache(entity, "l1", "hit", len(entries))
        return entries

    def _count(self, entity: str, level: str, policy: CachePolicy, entries: list[Entry], asked: int) -> None:
        """Lookups by result: `hit` (fresh), `expired` (found, past its TTL: revalidated), `miss`."""
        if not asked:
            return
        now = self.clock()
        fresh = sum(now - e.fetched_at < policy.ttl for e in entries)
        record_cache(entity, level, "hit", fresh)
        record_cache(entity, level, "expired", len(entries) - fresh)
        record_cache(entity, level, "miss", asked - len(entries))

    async def put_many(self, entity: str, scope: str, entries: dict[int, Entry], policy: CachePolicy) -> set[int]:
        """Write each entry where it is not older than what L1 holds; the ids L1 took."""
        keep = policy.ttl + policy.max_stale
        items = {self.key(entity, i): entry for i, entry in entries.items()}
        taken = set()
        for (i, entry), key in zip(entries.items(), items):
            if await self.memory.put(key, scope, entry, keep):
                taken.add(i)
        if self.redis is not None and items:
            try:
                await self.redis.put_many(items, scope, keep)
            except RedisUnavailable:
                pass
        return taken

    async def invalidate(self, entity: str, entity_id: int, version: int, keep: float) -> None:
        await self.invalidate_many([(entity, entity_id, version, keep)])

    async def invalidate_many(self, changes: Iterable[tuple[str, int, int, float]]) -> None:
        """Raise floors, `(entity, id, version, seconds kept)` each: in L1 at once, then in
        Redis in one call that also publishes them to the other instances."""
        floors: dict[str, tuple[int, float]] = {}
        entities: dict[str, str] = {}
        for entity, entity_id, version, keep in changes:
            self._epochs[entity] = self.epoch(entity) + 1
            key = self.key(entity, entity_id)
            await self.memory.invalidate(key, version, keep)
            if version > floors.get(key, (0, 0.0))[0]:
                floors[key], entities[key] = (version, keep), entity
        if self.redis is None or not floors:
            return
        try:
            await self.redis.invalidate_many(floors, self.channel, self.origin)
        except RedisUnavailable:
            for key, (version, keep) in floors.items():
                self._pend(entities[key], key, version, keep)
            return
        if self._pending or self._lost:
            await self.repair()

    def _pend(self, entity: str, key: str, version: int, keep: float) -> None:
        if key in self._pending or len(self._pending) < self.max_pending:
            if version > self._pending.get(key, (0, 0.0))[0]:
                self._pending[key] = (version, keep)
        else:
            self._lost.add(entity)

    def _repair_soon(self) -> None:
        """`repair` in a task of its own: a repair is many Redis calls (500 keys each, and a
        scan per dropped type), and another may hold the lock; a request waits for neither."""
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.ensure_future(self.repair())

    @property
    def settled(self) -> bool:
        """Redis holds every floor raise this instance made (nothing queued)."""
        return not self._pending and not self._lost

    async def repair(self) -> bool:
        """Apply the floor raises Redis missed while it was away (or drop the entity types
        whose raises overflowed the queue); True once nothing is left to apply."""
        if self.redis is None:
            return True
        if self.settled or self.redis.resting():
            return self.settled
        async with self._repairing:
            try:
                while self._pending:
                    batch = dict(list(self._pending.items())[:500])
                    await self.redis.invalidate_many(batch, self.channel, self.origin)
                    for key, floor in batch.items():
                        if self._pending.get(key) == floor:
                            del self._pending[key]
                for entity in list(self._lost):
                    await self.redis.drop_prefix(self.key(entity, ""))
                    self._lost.discard(entity)
            except RedisUnavailable:
                return False
        log.info("redis has every floor raise it missed again")
        return True

    async def listen(self) -> None:
        """Raise L1 floors as other instances publish theirs (runs for the app's life)."""
        if self.redis is not None:
            await self.redis.listen(self.channel, self._heard, self._subscribed)

    async def _subscribed(self) -> None:
        await self.repair()  # Redis is reachable again: what it missed goes first

    async def _heard(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            if message["o"] == self.origin:
                return
            floors = [(str(key), int(version), float(expiry) / 1000) for key, version, expiry in message["r"]]
        except (ValueError, KeyError, TypeError):
            return  # not ours to understand: the channel is shared by name only
        for key, version, keep in floors:
            self._epochs[key.rsplit(":", 2)[-2]] = self.epoch(key.rsplit(":", 2)[-2]) + 1
            await self.memory.invalidate(key, version, keep)
        self.heard += len(floors)

    async def evict(self, entity: str, ids: Iterable[int | str], keep: float) -> None:
        """Forget what is cached for these entities, in every scope and both levels: a write
        through this gateway has just changed them (ARCHITECTURE.md, "Writes"), so the
        writer reads its write at once instead of waiting for the change feed. The version
        floor stays: an event already seen still holds back older answers."""
        self._epochs[entity] = self.epoch(entity) + 1  # a read in flight from before must not be joined
        for entity_id in ids:
            key = self.key(entity, entity_id)
            await self.memory.evict(key, keep)
            if self.redis is not None:
                try:
                    await self.redis.evict(key)
                except RedisUnavailable:
                    pass

    def distrust(self, service: str) -> None:
        self._trusted_after[service] = self.clock()

    async def drop(self, service: str, entities: Iterable[str]) -> None:
        """Forget a service's entries (a gap in its feed: changes were missed); Redis keeps
        their floors (`_EVICT`)."""
        self.distrust(service)
        for entity in entities:
            self._epochs[entity] = self.epoch(entity) + 1
            prefix = self.key(entity, "")
            await self.memory.drop_prefix(prefix)
            if self.redis is not None:
                try:
                    await self.redis.drop_prefix(prefix)
                except RedisUnavailable:
                    self._lost.add(entity)
