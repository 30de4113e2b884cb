"""The GraphQL types: names for frontend developers, not copies of REST payloads
(DESIGN §3). Fields backed by another service are nullable, so a failing service
nulls that field, not the whole order."""

from __future__ import annotations

import base64
import enum
import re
from datetime import datetime
from typing import Any

import strawberry
from strawberry.types import Info

from gateway.context import RequestContext
from gateway.errors import BadUserInput
from gateway.cache import CachePolicy
from gateway.loading import Binding, contract, resolve

Ctx = Info[RequestContext, None]
_ID = re.compile(r"[1-9][0-9]{0,17}")


def int_id(raw: str, what: str = "id") -> int:
    if not _ID.fullmatch(str(raw)):
        raise BadUserInput(f"{what} must be a positive integer id, got {str(raw)[:40]!r}")
    return int(raw)


def _time(raw: str) -> datetime:
    return datetime.fromisoformat(raw)


@strawberry.enum(description="Where an order is in its life.")
class OrderStatus(enum.Enum):
    PLACED = "PLACED"
    PAID = "PAID"
    SHIPPED = "SHIPPED"
    DELIVERED = "DELIVERED"
    CANCELLED = "CANCELLED"


@strawberry.enum
class PaymentStatus(enum.Enum):
    PENDING = "PENDING"
    CAPTURED = "CAPTURED"
    REFUNDED = "REFUNDED"
    FAILED = "FAILED"


@strawberry.enum
class ShipmentStatus(enum.Enum):
    PENDING = "PENDING"
    IN_TRANSIT = "IN_TRANSIT"
    DELIVERED = "DELIVERED"
    RETURNED = "RETURNED"


@strawberry.type(description="An amount of money; `amount` is a decimal string, exact to the cent.")
class Money:
    amount: str
    currency: str

    @classmethod
    def of(cls, p: dict[str, Any]) -> Money:
        if not isinstance(p["amount"], str) or not isinstance(p["currency"], str):
            raise TypeError("money must be a decimal string and a currency code")
        return cls(amount=p["amount"], currency=p["currency"])


@strawberry.type
class Author:
    id: strawberry.ID
    name: str
    bio: str
    version: int

    @classmethod
    def of(cls, p: dict[str, Any]) -> Author:
        return cls(id=strawberry.ID(str(p["id"])), name=p["name"], bio=p["bio"], version=p["version"])


@strawberry.type(description="Stock of one book, from the inventory service.")
class Stock:
    available: int
    warehouse: str
    version: int

    @strawberry.field(description="True when at least one copy can be sold now.")
    def in_stock(self) -> bool:
        return self.available > 0

    @classmethod
    def of(cls, p: dict[str, Any]) -> Stock:
        return cls(available=int(p["available"]), warehouse=p["warehouse"], version=p["version"])


@strawberry.type
class Book:
    id: strawberry.ID
    title: str
    isbn: str
    price: Money
    published_year: int
    version: int
    author_id: strawberry.Private[int]

    @strawberry.field
    async def author(self, info: Ctx) -> Author | None:
        return await resolve(info, AUTHOR, self.author_id)

    @strawberry.field
    async def stock(self, info: Ctx) -> Stock | None:
        return await resolve(info, STOCK, int(self.id))

    @classmethod
    def of(cls, p: dict[str, Any]) -> Book:
        return cls(id=strawberry.ID(str(p["id"])), title=p["title"], isbn=p["isbn"], price=Money.of(p["price"]),
                   published_year=p["publishedYear"], version=p["version"], author_id=int(p["authorId"]))


@strawberry.type
class OrderItem:
    quantity: int
    unit_price: Money = strawberry.field(description="What was paid per copy, at purchase time.")
    title_at_purchase: str
    book_id: strawberry.Private[int]

    @strawberry.field(description="The book as the catalog has it now.")
    async def book(self, info: Ctx) -> Book | None:
        return await resolve(info, BOOK, self.book_id)

    @classmethod
    def of(cls, p: dict[str, Any]) -> OrderItem:
        return cls(quantity=int(p["quantity"]), unit_price=Money.of(p["unitPrice"]),
                   title_at_purchase=p["titleAtPurchase"], book_id=int(p["bookId"]))


@strawberry.type
class Payment:
    id: strawberry.ID
    amount: Money
    method: str
    status: PaymentStatus
    version: int

    @classmethod
    def of(cls, p: dict[str, Any]) -> Payment:
        return cls(id=strawberry.ID(str(p["id"])), amount=Money.of(p["amount"]), method=p["method"],
                   status=PaymentStatus(p["status"]), version=p["version"])


@strawberry.type
class Shipment:
    id: strawberry.ID
    carrier: str
    tracking_number: str
    status: ShipmentStatus
    estimated_delivery: datetime
    version: int

    @classmethod
    def of(cls, p: dict[str, Any]) -> Shipment:
        return cls(id=strawberry.ID(str(p["id"])), carrier=p["carrier"], tracking_number=p["trackingNumber"],
                   status=ShipmentStatus(p["status"]), estimated_delivery=_time(p["estimatedDelivery"]),
                   version=p["version"])


@strawberry.type
class Order:
    id: strawberry.ID
    status: OrderStatus
    placed_at: datetime
    total: Money
    items: list[OrderItem]
    version: int
    customer_id: strawberry.Private[int]

    @strawberry.field
    async def customer(self, info: Ctx) -> Customer | None:
        return await resolve(info, CUSTOMER, self.customer_id)

    @strawberry.field(description="Null while the order is unpaid.")
    async def payment(self, info: Ctx) -> Payment | None:
        return await resolve(info, PAYMENT, int(self.id))

    @strawberry.field(description="Null until the order ships.")
    async def shipment(self, info: Ctx) -> Shipment | None:
        return await resolve(info, SHIPMENT, int(self.id))

    @classmethod
    def of(cls, p: dict[str, Any]) -> Order:
        return cls(id=strawberry.ID(str(p["id"])), status=OrderStatus(p["status"]), placed_at=_time(p["placedAt"]),
                   total=Money.of(p["total"]), items=[OrderItem.of(i) for i in p["items"]], version=p["version"],
                   customer_id=int(p["customerId"]))


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class OrderEdge:
    cursor: str
    node: Order


@strawberry.type(description="A page of orders, newest first (Relay cursor connection).")
class OrderConnection:
    edges: list[OrderEdge]
    page_info: PageInfo
    total_count: int

    @strawberry.field(description="The orders of this page, without the edges.")
    def nodes(self) -> list[Order]:
        return [edge.node for edge in self.edges]


def _cursor(order_id: str) -> str:
    # Our cursor is the service's cursor for "after this order"; both stay opaque.
    return base64.urlsafe_b64encode(f"order:{order_id}".encode()).decode().rstrip("=")


@strawberry.type
class Customer:
    id: strawberry.ID
    name: str
    email: str
    tier: str
    version: int

    @strawberry.field(description="This customer's orders, newest first.")
    async def orders(self, info: Ctx, first: int = 10, after: str | None = None) -> OrderConnection:
        if not 1 <= first <= 100:
            raise BadUserInput("first must be from 1 to 100")
        url = f"/orders?customerId={int(self.id)}&limit={first}"
        if after is not None:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", after):
                raise BadUserInput("after is not a cursor this API issued")
            url += f"&after={after}"
        page = await info.context.loaders.page(ORDER, url)
        with contract(ORDER.service, "order page"):
            return OrderConnection(
                edges=[OrderEdge(cursor=_cursor(order.id), node=order) for order in page["data"]],
                page_info=PageInfo(has_next_page=page["nextCursor"] is not None, end_cursor=page["nextCursor"]),
                total_count=int(page["totalCount"]),
            )

    @classmethod
    def of(cls, p: dict[str, Any]) -> Customer:
        return cls(id=strawberry.ID(str(p["id"])), name=p["name"], email=p["email"], tier=p["tier"], version=p["version"])


# The entity bindings: which service answers for which type, through which batch route,
# and how long its data may be cached. Prices and stock move; authors hardly ever do.
# Personal data (customers, their orders, payments, shipments) is cached per caller.
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
CUSTOMER = Binding("customer", "customers", "/customers", Customer.of, policy=CachePolicy(MINUTE, HOUR, private=True))
BOOK = Binding("book", "catalog", "/books", Book.of, policy=CachePolicy(30.0, HOUR))
AUTHOR = Binding("author", "catalog", "/authors", Author.of, policy=CachePolicy(HOUR, DAY))
STOCK = Binding("stock", "inventory", "/stock", Stock.of, param="bookIds", key="bookId", optional=True,
                policy=CachePolicy(5.0, 10 * MINUTE))
ORDER = Binding("order", "orders", "/orders", Order.of, policy=CachePolicy(MINUTE, HOUR, private=True))
# Looked up by order id while their change events name the payment's or shipment's own
# id, so events cannot find these entries: they live by their (short) TTL alone.
PAYMENT = Binding("payment", "payments", "/payments", Payment.of, param="orderIds", key="orderId", optional=True,
                  policy=CachePolicy(15.0, HOUR, private=True))
SHIPMENT = Binding("shipment", "shipping", "/shipments", Shipment.of, param="orderIds", key="orderId", optional=True,
                   policy=CachePolicy(15.0, HOUR, private=True))
BINDINGS = (CUSTOMER, BOOK, AUTHOR, STOCK, ORDER, PAYMENT, SHIPMENT)
