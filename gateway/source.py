"""The entity source (ARCHITECTURE.md, "Entity source"): the one read-through layer between
the executors and the services. Asked for (binding, keys) on behalf of a caller, it answers
per key with the parsed entity, ``None`` (an optional relation that has none), a
`GatewayError`, or a `Stale` value, and owns everything in between:

- cache lookup and freshness, and the private-scope rule, written once here: private data
  is cached per caller and never for anonymous callers;
- one call per chunk of ``maxBatch`` ids, chunks sent concurrently, de-duplicated ids;
- single-flight of identical reads in flight from concurrent requests (reads only; private
  data only within one caller; never across a change event);
- the version guard: a lagging answer never replaces a newer version the cache holds;
- stale-if-error: an entry within max-stale is served when the service fails;
- ownership (ARCHITECTURE.md, "Callers"): an entity whose binding names an `owner` is
  given only to that customer or to staff; anonymous callers get UNAUTHENTICATED without
  a call, and another customer's entity FORBIDDEN, never cached in the asker's scope.

It knows nothing of books: a `Binding` says which route answers for an entity."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cache import CachePolicy, EntityCache, Entry
from .errors import Forbidden, GatewayError, NotFound, Unauthenticated, UpstreamBadResponse, UpstreamError
from .flights import SingleFlight
from .memo import Memos
from .metrics import record_cache, record_stale
from .resilience import Deadline
from .telemetry import annotate, batch_span, failed, observe_batches, recording
from .upstream import Upstream

if TYPE_CHECKING:
    from .auth import Caller
    from .consistency import Session

__all__ = ["Binding", "EntitySource", "Peeked", "Reader", "Stale", "contract"]


_BREACHES = (KeyError, TypeError, ValueError, AttributeError)


def _breach(service: str, what: str, exc: Exception) -> UpstreamBadResponse:
    error = UpstreamBadResponse(f"{service} sent a {what} not in its contract ({exc!r})", service=service)
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def contract(service: str, what: str) -> Iterator[None]:
    """A payload that lacks a field or has one of the wrong type breaks the service's
    contract: that is the service's fault (UPSTREAM_BAD_RESPONSE), not an internal error."""
    try:
        yield
    except _BREACHES as exc:
        raise _breach(service, what, exc) from exc


@dataclass(frozen=True)
class Binding:
    """How one entity type is fetched: ``GET {path}?{param}=1,2,3`` on `service`, each item
    of the answer's ``data`` matched to the id asked for by its `key` field."""

    entity: str
    service: str
    path: str
    parse: Callable[[dict[str, Any]], Any]
    param: str = "ids"
    key: str = "id"  # the payload field that answers to the requested id
    optional: bool = False  # absent means "there is none" (an order's payment), not an error
    policy: CachePolicy | None = None  # None: never cached
    # The parsed entity's attribute that equals the key it was fetched by (None: no such
    # attribute, e.g. a payment fetched by its order's id). A relation keyed by it can be
    # read in the same level as this entity: its keys are known before the entity is.
    identity: str | None = "id"
    # One-to-many: each key has a list of items (the reviews of a book), grouped by `key`
    # from one batch answer; a key with none gets an empty list. Never cached.
    many: bool = False
    # The event field naming the key this entity is cached under when that is not its own
    # id (a payment cached by its order: "orderId"). Such entries are ordered by feed
    # position, not version: several entities answer for one key over time (gateway/feed.py).
    feed_key: str | None = None
    # The event entity whose changes invalidate this one's entries, when it has no events of
    # its own: a customer's pages of orders follow "order" events, by their `feed_key`.
    follows: str | None = None
    # The payload field naming the customer who owns the entity (an order's "customerId");
    # when it is `key` itself (a customer's "id"), ownership is known before the call.
    owner: str | None = None
    # Owned by whoever owns the entity it is read from (a payment, by its order's customer):
    # read only from an entity the caller may see, so never in the same level as that one.
    through_parent: bool = False

    def __post_init__(self) -> None:
        if self.many and self.policy is not None:
            raise ValueError(f"{self.entity}: one-to-many bindings are not cached")
        if self.follows is not None and self.feed_key is None:
            raise ValueError(f"{self.entity}: follows {self.follows} events by which field? (feed_key)")


@dataclass(frozen=True)
class Stale:
    """A value served from cache because its service failed; where it is served is reported."""

    value: Any
    service: str
    version: int
    age_ms: int


class EntitySource:
    """Long-lived (made in the app's lifespan): the cache, the upstream clients, the
    single-flight table and the effective cache policies. `reader()` gives a request's view."""

    def __init__(self, upstream: Upstream, cache: EntityCache | None = None,
                 policies: Mapping[str, CachePolicy] | None = None, flights: SingleFlight | None = None) -> None:
        self.upstream = upstream
        self.cache = cache
        self.policies = dict(policies or {})
        self.flights = flights
        # Answers made wholly of fresh entries in memory, given again while those last.
        self.memos = Memos() if cache is not None else None

    def reader(self, caller: Caller | None = None, deadline: Deadline | None = None,
               session: Session | None = None) -> Reader:
        return Reader(self, caller, deadline, session)

    def policy(self, binding: Binding) -> CachePolicy | None:
        return self.policies.get(binding.entity, binding.policy)


class Reader:
    """One request's reads: its verified caller (None: anonymous) and its deadline."""

    def __init__(self, source: EntitySource, caller: Caller | None, deadline: Deadline | None,
                 session: Session | None = None) -> None:
        self.source = source
        self.caller = caller
        # The private cache scope and single-flight key: a hash of the verified subject.
        self.identity = caller.key if caller is not None else None
        self.deadline = deadline
        self.session = session  # the request's consistency token (gateway/consistency.py)
        self.traced = recording()  # the operation's reads get spans, cache hits too: `read` makes them
        self.peeked: list[Peeked] | None = None  # a list: `peek` notes each warm read in it

    async def read(self, binding: Binding, keys: list[Any], query: str = "", include: Include = (),
                   included: dict[int, dict[Any, Any]] | None = None) -> dict[Any, Any]:
        """Every key's answer; `query` is appended to each call's URL (e.g. ``&limit=20``).
        `include`: related entities the service sends along when asked (a book's author), by
        name and binding: cached like any read of theirs, or, where their type is not cached,
        put in `included` (by binding, then key), so that they are not read again."""
        out, unique = self._unasked(binding, keys)
        if not unique:
            return out
        size = self.source.upstream.max_batch(binding.service)
        chunks = [unique[i:i + size] for i in range(0, len(unique), size)]
        if len(chunks) == 1 and not out:
            return await self._chunk(binding, chunks[0], query, include, included)
        for part in await asyncio.gather(*(self._chunk(binding, c, query, include, included) for c in chunks)):
            out.update(part)
        return out

    def peek(self, binding: Binding, keys: list[Any], query: str = "") -> dict[Any, Any] | None:
        """`read`'s answer when every key's entry is fresh in this process's memory, found
        without an await: a warm query's reads need no task, coroutine or call. None when
        anything needs more (a miss, an entry past its TTL, a token naming a position this
        instance has not reached, a traced operation, whose read spans are made by `read`):
        then `read` it."""
        cache = self.source.cache
        if cache is None or self.traced:
            return None
        if (session := self.session) is not None and not session.ready(binding.service):
            return None
        scoped = self._scope(binding, query)
        if scoped is None:
            return None
        policy, scope = scoped
        out, unique = self._unasked(binding, keys)
        if not unique:
            return out
        service = binding.service
        entries = cache.peek_many(binding.entity, scope, unique, policy, service)
        if entries is None:
            return None
        size = self.source.upstream.max_batch(service)
        sizes = tuple(min(size, len(unique) - i) for i in range(0, len(unique), size))
        observe_batches(service, binding.path, sizes)
        seq, owned = 0, binding.owner is not None
        for key, entry in zip(unique, entries):
            if entry.seq > seq:
                seq = entry.seq
            parsed = entry.parsed  # `_cached`, inline for what was parsed before and has no owner to check
            out[key] = parsed if parsed is not None and not owned else self._cached(binding, key, entry)
        if session is not None:
            session.saw(service, seq)
        if self.peeked is not None:
            self.peeked.append(Peeked(binding, scope, policy, unique, entries, sizes, seq))
        return out

    def again(self, reads: Sequence[Peeked]) -> bool:
        """Whether each of `reads` (warm reads an earlier request made) would find the very
        same entries in memory now, all still fresh; if so, they count as read again (cache
        hits, batch sizes, the consistency token's positions), as `peek` counts them. A
        remembered answer made of them is then the answer `peek` and shaping would give
        (gateway/memo.py)."""
        cache, session = self.source.cache, self.session
        if cache is None or self.traced:
            return False
        for r in reads:
            service = r.binding.service
            if session is not None and not session.ready(service):
                return False
            found = cache.peek_many(r.binding.entity, r.scope, r.keys, r.policy, service, count=False)
            if found is None or any(now is not then for now, then in zip(found, r.entries)):
                return False
        for r in reads:
            record_cache(r.binding.entity, "l1", "hit", len(r.entries))
            observe_batches(r.binding.service, r.binding.path, r.sizes)
            if session is not None:
                session.saw(r.binding.service, r.seq)
        return True

    def _unasked(self, binding: Binding, keys: list[Any]) -> tuple[dict[Any, Any], list[Any]]:
        """The keys refused without asking (ownership known from the key, a customer's id,
        or no caller at all), and the distinct keys left to read."""
        unique = list(dict.fromkeys(keys))
        out: dict[Any, Any] = {}
        if binding.owner is not None or binding.through_parent:
            for key in unique:
                if (refused := self.denied(binding, key if binding.owner == binding.key else None)) is not None:
                    out[key] = refused
            if out:
                unique = [k for k in unique if k not in out]
        return out, unique

    def denied(self, binding: Binding, owner: Any = None) -> GatewayError | None:
        """Why this caller may not have `binding`'s entity owned by `owner` (None: not yet
        known, only a caller is needed); None when it may."""
        if binding.owner is None and not binding.through_parent:
            return None
        if self.caller is None:
            return Unauthenticated(f"this {binding.entity} is private: sign in (Authorization: Bearer <token>)")
        if owner is not None and not self.caller.owns(owner):
            return Forbidden(f"this {binding.entity} belongs to another customer")
        return None

    def _refused(self, binding: Binding, payload: Any) -> GatewayError | None:
        if binding.owner is None or not isinstance(payload, dict):
            return None
        return self.denied(binding, payload.get(binding.owner))

    async def page(self, binding: Binding, url: str, owner: Any = None) -> Any:
        """One non-batch read (a cursor page) of `owner`'s, parsed with `binding.parse`; an error is returned."""
        if (refused := self.denied(binding, owner)) is not None:
            return refused
        with batch_span(binding.service, binding.path):
            try:
                body, _ = await self._get(binding, url, await self._settle(binding))
                with contract(binding.service, binding.entity):
                    return binding.parse(body)
            except GatewayError as exc:
                failed(exc)
                return exc

    # -- one batch call ------------------------------------------------------------------

    def _scope(self, binding: Binding, query: str = "") -> tuple[CachePolicy, str] | None:
        """Where `binding`'s entries live for this caller; None: nothing is cached. A read
        with a `query` (a page's ``&limit=20``) has entries of its own beside the others of
        the key: an event or an eviction drops them all."""
        policy = self.source.policy(binding)
        if self.source.cache is None or policy is None or policy.ttl + policy.max_stale <= 0:
            # Nothing to keep. A TTL of 0 alone is "always revalidate" (README, "The versioned
            # cache"): entries are never fresh, so every read asks the service, and are kept
            # for max-stale, to be served when it fails (issue 25).
            return None
        if policy.private:
            # Private data is cached per caller and never for anonymous callers (ARCHITECTURE.md).
            return (policy, f"u:{self.identity}{query}") if self.identity else None
        return policy, f"public{query}"

    async def _chunk(self, binding: Binding, keys: list[Any], query: str, include: Include = (),
                     included: dict[int, dict[Any, Any]] | None = None) -> dict[Any, Any]:
        with batch_span(binding.service, binding.path, len(keys)):
            bypass = await self._settle(binding)
            scoped = None if bypass else self._scope(binding, query)
            if scoped is None:
                fetched = await self._fetch(binding, keys, query, bypass, include)
                await self._take_included(include, fetched, included, bypass)
                return {k: self._result(binding, k, fetched) for k in keys}
            cache = self.source.cache
            assert cache is not None
            policy, scope = scoped
            cached, fresh = await cache.get_many(binding.entity, scope, keys, policy)
            need = [k for k in keys if k not in fresh]
            annotate(cache_hits=len(keys) - len(need), cache_misses=len(need))
            fetched = await self._fetch(binding, need, query, include=include) if need else {}
            await self._take_included(include, fetched, included)
            now = cache.clock()
            entries: dict[Any, Entry] = {}
            if isinstance(fetched, dict):
                seq = self._seen(binding, fetched, cached)
                for k in need:
                    p = fetched.get(k)
                    if self._refused(binding, p) is not None:
                        continue  # another customer's: never cached in this caller's scope
                    if (entry := _entry(binding, p, seq, now)) is not None:
                        entries[k] = entry
                await cache.put_many(binding.entity, scope, entries, policy)
            else:
                self._seen(binding, None, cached)
            out, stale = {}, 0
            for k in keys:
                entry = cached.get(k)
                if k not in need:
                    out[k] = self._cached(binding, k, entry)  # type: ignore[arg-type]
                elif isinstance(fetched, UpstreamError):
                    if entry is not None and cache.usable_stale(entry, policy):
                        value = self._cached(binding, k, entry)
                        if not isinstance(value, Exception):
                            version = entry.payload.get("version", entry.version) if entry.payload else entry.version
                            value = Stale(value, binding.service, version, int((now - entry.fetched_at) * 1000))
                            stale += 1
                        out[k] = value
                    else:
                        out[k] = fetched
                elif entry is not None and k in entries and entry.version > entries[k].version:
                    # Never show older data than we have seen: a lagging answer loses.
                    out[k] = self._cached(binding, k, entry)
                else:
                    out[k] = self._result(binding, k, fetched)
            if stale:
                annotate(stale_served=stale)
                record_stale(binding.entity, stale)
            return out

    async def _fetch(self, binding: Binding, keys: list[Any], query: str,
                     bypass: bool = False, include: Include = ()) -> dict[Any, Any] | UpstreamError:
        """One batch call: the payloads found, by key (the answer's feed position under
        `_POSITION`, the related entities it was asked to include under `_INCLUDED`), or the
        error that stands for every key."""
        url = f"{binding.path}?{binding.param}={','.join(map(str, keys))}{query}"
        if include:
            url += "&include=" + ",".join(name for name, _ in include)
        try:
            body, seq = await self._get(binding, url, bypass)
            return _index(body, binding, seq, include)
        except UpstreamError as exc:
            failed(exc)
            return exc

    async def _take_included(self, include: Include, fetched: dict[Any, Any] | UpstreamError,
                             included: dict[int, dict[Any, Any]] | None, bypass: bool = False) -> None:
        """The related entities an answer carried, handed over in `included` (by binding,
        then key) as if read. Where their type is cached, they are written as their own read
        would write them, and handed over only where the cache took them: one older than a
        version this instance has seen is left out, to be read on its own (ARCHITECTURE.md,
        "Versioned cache")."""
        if not include or not isinstance(fetched, dict):
            return
        cache, seq = self.source.cache, max(0, int(fetched.get(_POSITION, 0)))
        for name, related in include:
            payloads: dict[Any, Any] = fetched.get(_INCLUDED, {}).get(name) or {}
            scoped = None if bypass else self._scope(related)
            entries: dict[Any, Entry] = {}
            if scoped is not None and cache is not None:
                now = cache.clock()
                entries = {key: entry for key, p in payloads.items()
                           if (entry := _entry(related, p, seq, now)) is not None}
                taken = await cache.put_many(related.entity, scoped[1], entries, scoped[0])
                payloads = {key: p for key, p in payloads.items() if key in taken}
            if included is not None and payloads:
                found = included.setdefault(id(related), {})
                for key, payload in payloads.items():
                    entry = entries.get(key)
                    found.setdefault(key, self._cached(related, key, entry) if entry is not None
                                     else self._parse(related, key, payload))
                if self.session is not None:
                    self.session.saw(related.service, seq)

    async def _get(self, binding: Binding, url: str, bypass: bool = False) -> tuple[Any, int]:
        """The answer, and the feed position it reflects (-1: unknown)."""
        source = self.source
        session = self.session

        async def get() -> Any:
            return await source.upstream.get_json_at(binding.service, url, deadline=self.deadline)

        policy = source.policy(binding)
        private = policy is None or policy.private
        if source.flights is None or (private and not self.identity) or bypass:
            answer = await get()  # anonymous callers of private data share nothing
        else:
            # A flight begun before a change event for this type may carry the old version;
            # one begun by a request with an older token (or none) may predate the write the
            # token names: requests share flights only with the same position asked.
            epoch = source.cache.epoch(binding.entity) if source.cache is not None else 0
            asked = session.want(binding.service) if session is not None else 0
            key: Hashable = (binding.service, url, self.identity if private else None, epoch, asked)
            answer, joined = await source.flights.do(key, get)
            if joined:
                annotate(shared_flight=True)
        body, seq = answer
        if session is not None:
            if bypass:
                session.refute(binding.service, seq)
            session.saw(binding.service, seq)
        return body, seq

    # -- consistency hooks (gateway/consistency.py) ------------------------------------------

    async def _settle(self, binding: Binding) -> bool:
        """True: this request's token names a position of the service this instance could
        not catch up with in time, so its caches are bypassed."""
        session = self.session
        return session is not None and session.asks(binding.service) and await session.settle(binding.service)

    def _seen(self, binding: Binding, fetched: dict[Any, Any] | None, cached: dict[Any, Entry]) -> int:
        """The fetched answer's feed position; the token records the cached entries' too."""
        if self.session is not None:
            for entry in cached.values():
                self.session.saw(binding.service, entry.seq)
        return max(0, int(fetched.get(_POSITION, 0))) if fetched else 0

    def _result(self, binding: Binding, key: Any, fetched: dict[Any, Any] | UpstreamError) -> Any:
        if isinstance(fetched, UpstreamError):
            return fetched
        payload = fetched.get(key)
        return self._refused(binding, payload) or self._parse(binding, key, payload)

    def _cached(self, binding: Binding, key: Any, entry: Entry) -> Any:
        if (refused := self._refused(binding, entry.payload)) is not None:
            return refused
        if entry.parsed is not None:  # parsed when first served
            return entry.parsed
        if entry.payload is None:
            return self._parse(binding, key, None)
        try:
            with contract(binding.service, binding.entity):
                return entry.parse(binding.parse)
        except UpstreamBadResponse as exc:
            return exc

    @staticmethod
    def _parse(binding: Binding, key: Any, payload: Any) -> Any:
        if payload is None and not binding.many:
            if binding.optional:
                return None
            return NotFound(f"{binding.entity} {key} not found", service=binding.service)
        try:  # `contract`, inline: this runs for every entity fetched
            return [binding.parse(p) for p in payload or ()] if binding.many else binding.parse(payload)
        except _BREACHES as exc:
            return _breach(binding.service, binding.entity, exc)


# Where `_fetch` keeps the answer's feed position and its included entities among the
# payloads (no id is a string).
_POSITION = "_feedSeq"
_INCLUDED = "_included"
Include = Sequence[tuple[str, Binding]]  # (name, binding) of the related entities to send along


def _entry(binding: Binding, payload: Any, seq: int, now: float) -> Entry | None:
    """The cache entry of a payload read at feed position `seq`, or None when it has no
    version to be guarded by. Entities several of which answer for one key over time (a
    payment, by its order) are ordered by feed position instead (gateway/feed.py)."""
    by_seq = binding.feed_key is not None
    if isinstance(payload, dict) and (by_seq or isinstance(payload.get("version"), int)):
        return Entry(payload, seq if by_seq else payload["version"], now, binding.service, seq=seq)
    if payload is None and binding.optional:
        # "There is none" is an answer too; version 0 yields to any announced change.
        return Entry(None, seq if by_seq else 0, now, binding.service, seq=seq)
    return None


@dataclass(frozen=True, slots=True)
class Peeked:
    """One warm read as `Reader.peek` made it: what `Reader.again` checks and counts again."""

    binding: Binding
    scope: str
    policy: CachePolicy
    keys: list[Any]
    entries: list[Entry]
    sizes: tuple[int, ...]  # its batches, as it would have called the service
    seq: int  # the highest feed position among its entries


def _index(body: Any, binding: Binding, seq: int = 0, include: Include = ()) -> dict[Any, dict[str, Any]]:
    """Match a batch answer to the ids asked for; its order is not promised (README, services)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) and isinstance(item.get(binding.key), int) for item in data):
        raise UpstreamBadResponse(f"{binding.service} sent a batch answer not in its contract", service=binding.service)
    out: dict[Any, Any]
    if binding.many:
        out = {}
        for item in data:
            out.setdefault(item[binding.key], []).append(item)
    else:
        out = {item[binding.key]: item for item in data}
    out[_POSITION] = seq
    if include:
        # Optional for the service: what it did not send (or not in shape) is read on its own.
        sent = body.get("included")
        out[_INCLUDED] = {name: {item[related.key]: item for item in sent.get(name) or ()
                                 if isinstance(item, dict) and isinstance(item.get(related.key), int)}
                          for name, related in include if isinstance(sent, dict) and isinstance(sent.get(name), list)}
    return out
