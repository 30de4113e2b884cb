"""The root Subscription (ARCHITECTURE.md, "Live updates"): each field declares what it
follows with `Live`; the gateway's live hub serves them from the services' change feeds,
the payload shaped as the same selection on `Query.order` would be."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from gateway.live import Live, follow
from gateway.rules import Authenticated
from gateway.source import Reader, Stale

from .types import ORDER, ORDER_PAGES, PAYMENT, SHIPMENT, Ctx, Order

__all__ = ["Subscription"]

RECENT = 20  # orders myOrdersUpdated starts with


async def recent_orders(reader: Reader, customer: int) -> list[int]:
    """The customer's latest orders (their first page), oldest first: myOrdersUpdated's first messages."""
    page = (await reader.read(ORDER_PAGES, [customer], f"&limit={RECENT}"))[customer]
    if isinstance(page, Exception):
        raise page
    if isinstance(page, Stale):
        page = page.value
    return [int(edge.node.id) for edge in reversed(page.edges)]


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="The order now, then each time it, its payment or its shipment changes (its customer or staff).",
        metadata=Live(ORDER, "order", owner="customer_id", arg="id", related=(PAYMENT, SHIPMENT)).metadata(),
        directives=[Authenticated()])
    async def order_updated(self, info: Ctx, id: strawberry.ID) -> AsyncGenerator[Order | None, None]:
        async for order in follow(info, id=id):
            yield order

    @strawberry.subscription(
        description=f"The caller's {RECENT} latest orders now, oldest first, then each of the caller's orders "
                    "when it, its payment or its shipment changes.",
        metadata=Live(ORDER, "order", owner="customer_id", related=(PAYMENT, SHIPMENT),
                      current=recent_orders).metadata(), directives=[Authenticated()])
    async def my_orders_updated(self, info: Ctx) -> AsyncGenerator[Order | None, None]:
        async for order in follow(info):
            yield order
