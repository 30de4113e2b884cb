"""The root Subscription (ARCHITECTURE.md, "Live updates"): each field declares what it
follows with `Live`; the gateway's live hub serves them from the services' change feeds,
the payload shaped as the same selection on `Query.order` would be."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from gateway.live import Live, follow

from .types import ORDER, PAYMENT, SHIPMENT, Ctx, Order

__all__ = ["Subscription"]


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="The order now, then each time it, its payment or its shipment changes (its customer or staff).",
        metadata=Live(ORDER, "order", owner="customer_id", arg="id", related=(PAYMENT, SHIPMENT)).metadata())
    async def order_updated(self, info: Ctx, id: strawberry.ID) -> AsyncGenerator[Order | None, None]:
        async for order in follow(info, id=id):
            yield order

    @strawberry.subscription(
        description="Each of the caller's orders when it, its payment or its shipment changes.",
        metadata=Live(ORDER, "order", owner="customer_id", related=(PAYMENT, SHIPMENT)).metadata())
    async def my_orders_updated(self, info: Ctx) -> AsyncGenerator[Order | None, None]:
        async for order in follow(info):
            yield order
