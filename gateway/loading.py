"""Per-request batch loading (DESIGN §4). Knows nothing of books: an entity is bound
declaratively to a service's batch route, and every load of that entity in one tick of
the event loop becomes one call, de-duplicated and chunked at the service's maxBatch,
the chunks sent concurrently (strawberry's DataLoader does the batching)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from strawberry.dataloader import DataLoader

from .errors import NotFound, UpstreamBadResponse, UpstreamError
from .telemetry import batch_span
from .upstream import Upstream

__all__ = ["Binding", "Loaders", "contract"]


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


class Loaders:
    """The DataLoaders of one GraphQL request, one per binding, created on first use."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
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
            body = await self.upstream.get_json(binding.service, url)
            _index(body, binding)
        with contract(binding.service, f"{binding.entity} page"):
            return {**body, "data": [binding.parse(item) for item in body["data"]]}

    async def _fetch(self, binding: Binding, keys: list[int]) -> list[Any]:
        url = f"{binding.path}?{binding.param}={','.join(map(str, keys))}"
        try:
            with batch_span(binding.service, binding.path, len(keys)):
                found = _index(await self.upstream.get_json(binding.service, url), binding)
        except UpstreamError as exc:
            return [exc] * len(keys)
        return [self._result(binding, key, found.get(key)) for key in keys]

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
