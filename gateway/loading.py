"""Per-request batch loading (DESIGN §4). Knows nothing of books: an entity is bound
declaratively to a service's batch route, and every load of that entity in one tick of
the event loop becomes one call, de-duplicated and chunked at the service's maxBatch,
the chunks sent concurrently (strawberry's DataLoader does the batching).

A batch first asks the entity cache; only ids without a fresh entry go to the service,
in one call. When that call fails, entries past their TTL but within max-stale are
served instead, and each such field is reported in `extensions.stale`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from strawberry.dataloader import DataLoader
from strawberry.types import Info

from .cache import CachePolicy, EntityCache, Entry
from .errors import NotFound, UpstreamBadResponse, UpstreamError
from .flights import SingleFlight
from .metrics import record_stale
from .resilience import Deadline
from .telemetry import annotate, batch_span, failed
from .upstream import Upstream

__all__ = ["Binding", "Loaders", "Stale", "contract", "resolve", "resolve_each"]


@contextlib.contextmanager
def contract(service: str, what: str) -> Iterator[None]:
    """A payload that lacks a field or has one of the wrong type breaks the service's
    contract: that is the service's fault (UPSTREAM_BAD_RESPONSE), not an internal error."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamBadResponse(f"{service} sent a {what} not in its contract ({exc!r})", service=service) from exc


@dataclass(frozen=True)
class Binding:
    """How one entity type is fetched: ``GET {path}?{param}=1,2,3`` on `service`."""

    entity: str
    service: str
    path: str
    parse: Callable[[dict[str, Any]], Any]
    param: str = "ids"
    key: str = "id"  # the payload field that answers to the requested id
    optional: bool = False  # absent means "there is none" (an order's payment), not an error
    policy: CachePolicy | None = None  # None: never cached


@dataclass(frozen=True)
class Stale:
    """A value served from cache because its service failed; where it is served is reported."""

    value: Any
    service: str
    version: int
    age_ms: int


class Loaders:
    """The DataLoaders of one GraphQL request, one per binding, created on first use;
    every call they make shares the request's `deadline`."""

    def __init__(
        self,
        upstream: Upstream,
        cache: EntityCache | None = None,
        identity: str | None = None,
        policies: Mapping[str, CachePolicy] | None = None,
        deadline: Deadline | None = None,
        flights: SingleFlight | None = None,
    ) -> None:
        self.upstream = upstream
        self.cache = cache
        self.identity = identity
        self.policies = policies or {}
        self.deadline = deadline
        self.flights = flights
        self._loaders: dict[str, DataLoader[int, Any]] = {}

    def load(self, binding: Binding, key: int) -> Any:
        loader = self._loaders.get(binding.entity)
        if loader is None:
            loader = DataLoader(partial(self._fetch, binding), max_batch_size=self.upstream.max_batch(binding.service))
            self._loaders[binding.entity] = loader
        return loader.load(key)

    async def page(self, binding: Binding, url: str) -> dict[str, Any]:
        """A non-batch read (a cursor page) of `binding`'s entities, parsed."""
        with batch_span(binding.service, binding.path):
            body = await self.upstream.get_json(binding.service, url, deadline=self.deadline)
            _index(body, binding)
        with contract(binding.service, f"{binding.entity} page"):
            return {**body, "data": [binding.parse(item) for item in body["data"]]}

    def _policy(self, binding: Binding) -> CachePolicy | None:
        return self.policies.get(binding.entity, binding.policy)

    def _scope(self, binding: Binding) -> tuple[CachePolicy, str] | None:
        policy = self._policy(binding)
        if self.cache is None or policy is None:
            return None
        if policy.private:
            # Private data is cached per caller and never for anonymous ones (DESIGN §5).
            return (policy, f"u:{self.identity}") if self.identity else None
        return policy, "public"

    async def _fetch(self, binding: Binding, keys: list[int]) -> list[Any]:
        with batch_span(binding.service, binding.path, len(keys)):
            return await self._fetch_batch(binding, keys)

    async def _fetch_batch(self, binding: Binding, keys: list[int]) -> list[Any]:
        scoped = self._scope(binding)
        if scoped is None:
            return await self._fetch_upstream(binding, keys)
        assert self.cache is not None
        policy, scope = scoped
        cached = await self.cache.get_many(binding.entity, scope, keys, policy)
        fresh = {k: e for k, e in cached.items() if self.cache.fresh(e, policy)}
        need = [k for k in keys if k not in fresh]
        annotate(cache_hits=len(fresh), cache_misses=len(need))
        fetched = dict(zip(need, await self._fetch_upstream(binding, need, raw=True), strict=True)) if need else {}
        now = self.cache.clock()
        entries = {}
        for k, p in fetched.items():
            if isinstance(p, dict) and isinstance(p.get("version"), int):
                entries[k] = Entry(p, p["version"], now, binding.service)
            elif p is None and binding.optional:
                # "There is none" is an answer too; version 0 yields to any announced change.
                entries[k] = Entry(None, 0, now, binding.service)
        await self.cache.put_many(binding.entity, scope, entries, policy)
        results = []
        for key in keys:
            entry, got = fresh.get(key) or cached.get(key), fetched.get(key)
            if key in fresh:
                results.append(self._result(binding, key, entry.payload))  # type: ignore[union-attr]
            elif isinstance(got, UpstreamError) and entry is not None and self.cache.usable_stale(entry, policy):
                value = self._result(binding, key, entry.payload)
                age = int((now - entry.fetched_at) * 1000)
                results.append(value if isinstance(value, Exception) else Stale(value, binding.service, entry.version, age))
            elif key in entries and entry is not None and entry.version > entries[key].version:
                # Never show older data than we have seen: a lagging answer loses.
                results.append(self._result(binding, key, entry.payload))
            else:
                results.append(got if isinstance(got, Exception) else self._result(binding, key, got))
        if stale := sum(isinstance(r, Stale) for r in results):
            annotate(stale_served=stale)
            record_stale(binding.entity, stale)
        return results

    async def _fetch_upstream(self, binding: Binding, keys: list[int], raw: bool = False) -> list[Any]:
        """One batch call; per key the payload (or None), or the error for every key."""
        url = f"{binding.path}?{binding.param}={','.join(map(str, keys))}"
        try:
            found = await self._shared_get(binding, url)
        except UpstreamError as exc:
            failed(exc)
            return [exc] * len(keys)
        if raw:
            return [found.get(key) for key in keys]
        return [self._result(binding, key, found.get(key)) for key in keys]

    async def _shared_get(self, binding: Binding, url: str) -> dict[int, dict[str, Any]]:
        async def get() -> dict[int, dict[str, Any]]:
            return _index(await self.upstream.get_json(binding.service, url, deadline=self.deadline), binding)

        policy = self._policy(binding)
        private = policy is None or policy.private
        if self.flights is None or (private and not self.identity):
            return await get()  # anonymous callers of private data share nothing
        # A flight begun before a change event for this type may carry the old version.
        epoch = self.cache.epoch(binding.entity) if self.cache is not None else 0
        found, joined = await self.flights.do((binding.service, url, self.identity if private else None, epoch), get)
        if joined:
            annotate(shared_flight=True)
        return found

    @staticmethod
    def _result(binding: Binding, key: int, payload: dict[str, Any] | None) -> Any:
        if payload is None:
            if binding.optional:
                return None
            return NotFound(f"{binding.entity} {key} not found", service=binding.service)
        try:
            with contract(binding.service, binding.entity):
                return binding.parse(payload)
        except UpstreamBadResponse as exc:
            return exc


def _index(body: Any, binding: Binding) -> dict[int, dict[str, Any]]:
    """Match a batch answer to the ids asked for; its order is not promised (DESIGN §2)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) and isinstance(item.get(binding.key), int) for item in data):
        raise UpstreamBadResponse(f"{binding.service} sent a batch answer not in its contract", service=binding.service)
    return {item[binding.key]: item for item in data}


def _unwrap(info: Info, path: list[Any], value: Any) -> Any:
    if isinstance(value, Stale):
        info.context.extensions.setdefault("stale", []).append(
            {"path": path, "service": value.service, "version": value.version, "ageMs": value.age_ms})
        return value.value
    return value


async def resolve(info: Info, binding: Binding, key: int) -> Any:
    """Load `key` for the field being resolved, reporting it when served stale."""
    return _unwrap(info, info.path.as_list(), await info.context.loaders.load(binding, key))


def resolve_each(info: Info, binding: Binding, keys: list[int]) -> list[Any]:
    """A list field: one awaitable per item, so each item fails or is stale at its own path."""
    base = info.path.as_list()

    async def one(index: int, key: int) -> Any:
        return _unwrap(info, [*base, index], await info.context.loaders.load(binding, key))

    return [one(i, key) for i, key in enumerate(keys)]
