"""The root Query (ARCHITECTURE.md, "Schema"): each field reads entities by the ids in its
arguments, as its `Relation` declares."""

from __future__ import annotations

import strawberry

from gateway import Relation, resolve
from gateway.rules import Authenticated

from .types import BOOK, CUSTOMER, ORDER, Book, Ctx, Customer, Order


@strawberry.type
class Query:
    @strawberry.field(description="The caller's own customer record (null for staff, who are no customer).",
                      metadata=Relation(CUSTOMER, mine=True).metadata(), directives=[Authenticated()])
    async def me(self, info: Ctx) -> Customer | None:
        return await resolve(info)

    @strawberry.field(metadata=Relation(ORDER, arg="id").metadata(), directives=[Authenticated()])
    async def order(self, info: Ctx, id: strawberry.ID) -> Order | None:
        return await resolve(info, id=id)

    @strawberry.field(metadata=Relation(ORDER, arg="ids", many=True).metadata(), directives=[Authenticated()])
    def orders(self, info: Ctx, ids: list[strawberry.ID]) -> list[Order | None]:
        return resolve(info, ids=ids)

    @strawberry.field(metadata=Relation(CUSTOMER, arg="id").metadata(), directives=[Authenticated()])
    async def customer(self, info: Ctx, id: strawberry.ID) -> Customer | None:
        return await resolve(info, id=id)

    @strawberry.field(metadata=Relation(BOOK, arg="id").metadata())
    async def book(self, info: Ctx, id: strawberry.ID) -> Book | None:
        return await resolve(info, id=id)

    @strawberry.field(metadata=Relation(BOOK, arg="ids", many=True).metadata())
    def books(self, info: Ctx, ids: list[strawberry.ID]) -> list[Book | None]:
        return resolve(info, ids=ids)


__all__ = ["Query"]
