"""The root Query (ARCHITECTURE.md, "Schema"): each field reads entities by the ids in its
arguments, as its `Relation` declares."""

from __future__ import annotations

import strawberry

from gateway import Relation, resolve

from .types import BOOK, CUSTOMER, ORDER, Book, Ctx, Customer, Order


@strawberry.type
class Query:
    @strawberry.field(metadata=Relation(ORDER, arg="id").metadata())
    async def order(self, info: Ctx, id: strawberry.ID) -> Order | None:
        return await resolve(info, id=id)

    @strawberry.field(metadata=Relation(ORDER, arg="ids", many=True).metadata())
    def orders(self, info: Ctx, ids: list[strawberry.ID]) -> list[Order | None]:
        return resolve(info, ids=ids)

    @strawberry.field(metadata=Relation(CUSTOMER, arg="id").metadata())
    async def customer(self, info: Ctx, id: strawberry.ID) -> Customer | None:
        return await resolve(info, id=id)

    @strawberry.field(metadata=Relation(BOOK, arg="id").metadata())
    async def book(self, info: Ctx, id: strawberry.ID) -> Book | None:
        return await resolve(info, id=id)

    @strawberry.field(metadata=Relation(BOOK, arg="ids", many=True).metadata())
    def books(self, info: Ctx, ids: list[strawberry.ID]) -> list[Book | None]:
        return resolve(info, ids=ids)


__all__ = ["Query"]
