"""Relations as declarations (ARCHITECTURE.md, "Relations"). A field that reads another
entity declares how its keys are found, and both executors follow the declaration: the
planner reads it from the field's metadata to plan levels; the reference execution's
resolver calls `resolve`, which asks the same declaration for the keys.

    by id, from an argument      order(id)          Relation(ORDER, arg="id")
    many ids, from an argument   books(ids)         Relation(BOOK, arg="ids", many=True)
    by id, from the parent       Book.author        Relation(AUTHOR, via="author_id")
    by foreign key               Order.payment      Relation(PAYMENT, via="id")  (PAYMENT keyed by orderId)
    sent with the parent         Book.author        Relation(AUTHOR, via="author_id", included="author")
    one-to-many                  Book.reviews       Relation(REVIEWS, via="id")  (REVIEWS: Binding(..., many=True))
    paged, one-to-many           Customer.orders    Relation(ORDER_PAGES, via="id", paged=True)
    the caller's own             me                 Relation(CUSTOMER, mine=True)  (the token's customer)

A paged relation reads the first page of many parents' items in one call
(``GET /orders?customerIds=1,2&limit=N``); a page after a cursor is one call of its own."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from strawberry.dataloader import DataLoader
from strawberry.types import Info

from .auth import Caller
from .errors import BadUserInput, Unauthenticated
from .source import Binding, Reader, Stale

__all__ = ["Relation", "RELATION", "PageKey", "int_id", "resolve", "read_pages", "peek_pages", "Loaders"]

RELATION = "bookvault.relation"  # the key of a field's strawberry metadata
MAX_FIRST = 100
_ID = re.compile(r"[1-9][0-9]{0,17}")
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,64}")
PageKey = tuple[int, int, str | None]  # (parent id, first, after)


def int_id(raw: Any, what: str = "id") -> int:
    if not _ID.fullmatch(str(raw)):
        raise BadUserInput(f"{what} must be a positive integer id, got {str(raw)[:40]!r}")
    return int(raw)


@dataclass(frozen=True)
class Relation:
    binding: Binding
    via: str | None = None  # the parent's attribute that holds the key
    arg: str | None = None  # the argument that holds the key (the keys, when `many`)
    many: bool = False
    paged: bool = False  # arguments `first` and `after`; keys are `PageKey`s
    mine: bool = False  # the key is the caller's own customer id (gateway/auth.py)
    # The name under which the parent's service sends these entities along with the parent's
    # batch read when asked (`&include=<name>`, the answer's `included.<name>`): the parent
    # and these come in one call (a book and its author, both the catalog's).
    included: str | None = None
    # Entities one key stands for, for the cost analysis (gateway/cost.py); None: one, or a
    # paged relation's `first`.
    estimate: int | None = None

    def metadata(self) -> dict[str, Relation]:
        return {RELATION: self}

    def key_from_parent(self, parent: Any, args: dict[str, Any]) -> Any:
        return self.key_for(int(getattr(parent, self.via)), args)  # type: ignore[arg-type]

    def key_for(self, key: int, args: dict[str, Any]) -> Any:
        """The key to read for a parent whose `via` attribute is `key`."""
        if not self.paged:
            return key
        first, after = args.get("first", 10), args.get("after")
        if not 1 <= first <= MAX_FIRST:
            raise BadUserInput(f"first must be from 1 to {MAX_FIRST}")
        if after is not None and not _CURSOR.fullmatch(after):
            raise BadUserInput("after is not a cursor this API issued")
        return (key, first, after)

    def keys_from_args(self, args: dict[str, Any], caller: Caller | None = None) -> list[int]:
        """The keys of a root field: from its arguments, or the caller's customer id (none
        for a caller who is not a customer, e.g. staff: the field is null)."""
        if self.mine:
            if caller is None:
                raise Unauthenticated("`me` needs a caller: sign in (Authorization: Bearer <token>)")
            return [] if caller.customer_id is None else [caller.customer_id]
        raw = args[self.arg]  # type: ignore[index]
        if not self.many:
            return [int_id(raw)]
        # The number of ids per field (BOOKVAULT_MAX_IDS) is checked with the operation's
        # cost, before anything runs (gateway/cost.py).
        return [int_id(i) for i in raw]


async def read_pages(reader: Reader, binding: Binding, keys: list[PageKey]) -> dict[PageKey, Any]:
    """First pages of many parents in one call per page size; a page after a cursor alone."""
    out: dict[PageKey, Any] = {}
    firsts: dict[int, list[int]] = {}
    for key in keys:
        parent, first, after = key
        if after is None:
            firsts.setdefault(first, []).append(parent)
        else:
            url = f"{binding.path}?{binding.key}={parent}&limit={first}&after={after}"
            out[key] = await reader.page(binding, url, owner=parent)
    for first, parents in firsts.items():
        found = await reader.read(binding, parents, f"&limit={first}")
        out.update({(parent, first, None): found[parent] for parent in parents})
    return out


def peek_pages(reader: Reader, binding: Binding, keys: list[PageKey]) -> dict[PageKey, Any] | None:
    """`read_pages`' answer without an await (`Reader.peek`): first pages of one size, all
    fresh in memory; None otherwise."""
    if not keys or any(after is not None for _, _, after in keys) or len({first for _, first, _ in keys}) > 1:
        return None
    first = keys[0][1]
    found = reader.peek(binding, [parent for parent, _, _ in keys], f"&limit={first}")
    return None if found is None else {(parent, first, None): found[parent] for parent, _, _ in keys}


class Loaders:
    """The reference execution's DataLoaders for one request: one per binding and query,
    so every load of one tick becomes one `Reader.read` (chunked there)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self._loaders: dict[str, DataLoader[Any, Any]] = {}

    def load(self, relation: Relation, key: Any) -> Awaitable[Any]:
        binding = relation.binding
        name = f"{binding.entity}/{relation.paged}"
        loader = self._loaders.get(name)
        if loader is None:
            loader = DataLoader(self._batch(relation), cache=True)
            self._loaders[name] = loader
        return loader.load(key)

    def _batch(self, relation: Relation) -> Callable[[list[Any]], Awaitable[list[Any]]]:
        async def batch(keys: list[Any]) -> list[Any]:
            if relation.paged:
                found = await read_pages(self.reader, relation.binding, keys)
            else:
                found = await self.reader.read(relation.binding, keys)
            return [found[k] for k in keys]

        return batch


def _unwrap(info: Info, path: list[Any], value: Any) -> Any:
    if isinstance(value, Stale):
        info.context.extensions.setdefault("stale", []).append(
            {"path": path, "service": value.service, "version": value.version, "ageMs": value.age_ms})
        return value.value
    return value


def resolve(info: Info, parent: Any = None, **args: Any) -> Any:
    """The reference resolver of a relation field: what its declaration says, loaded through
    the request's DataLoaders. A list field gives one awaitable per item, so each item fails
    or is stale at its own path."""
    relation: Relation = info._field.metadata[RELATION]
    loaders: Loaders = info.context.loaders
    path = info.path.as_list()
    if relation.arg is None and not relation.mine:
        key = relation.key_from_parent(parent, args)

        async def one() -> Any:
            return _unwrap(info, path, await loaders.load(relation, key))

        return one()
    keys = relation.keys_from_args(args, loaders.reader.caller)

    async def item(index: int | None, key: int) -> Any:
        return _unwrap(info, path if index is None else [*path, index], await loaders.load(relation, key))

    if relation.many:
        return [item(i, key) for i, key in enumerate(keys)]
    if not keys:  # `me` of a caller who is no customer (staff)
        return _nothing()
    return item(None, keys[0])


async def _nothing() -> None:
    return None
