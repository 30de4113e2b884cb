"""The root Query (DESIGN §3)."""

from __future__ import annotations

from typing import Any

import strawberry

from gateway.errors import BadUserInput
from gateway.loading import resolve, resolve_each

from .types import BOOK, CUSTOMER, ORDER, Book, Ctx, Customer, Order, int_id

MAX_IDS = 500


def _many(info: Ctx, binding: Any, ids: list[strawberry.ID]) -> list[Any]:
    if len(ids) > MAX_IDS:
        raise BadUserInput(f"at most {MAX_IDS} ids per field")
    # A list of awaitables: each item fails or succeeds at its own path (orders.3).
    return resolve_each(info, binding, [int_id(i) for i in ids])


@strawberry.type
class Query:
    @strawberry.field
    async def order(self, info: Ctx, id: strawberry.ID) -> Order | None:
        return await resolve(info, ORDER, int_id(id))

    @strawberry.field
    def orders(self, info: Ctx, ids: list[strawberry.ID]) -> list[Order | None]:
        return _many(info, ORDER, ids)

    @strawberry.field
    async def customer(self, info: Ctx, id: strawberry.ID) -> Customer | None:
        return await resolve(info, CUSTOMER, int_id(id))

    @strawberry.field
    async def book(self, info: Ctx, id: strawberry.ID) -> Book | None:
        return await resolve(info, BOOK, int_id(id))

    @strawberry.field
    def books(self, info: Ctx, ids: list[strawberry.ID]) -> list[Book | None]:
        return _many(info, BOOK, ids)
