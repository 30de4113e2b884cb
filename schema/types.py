"""The GraphQL types: names for frontend developers, not copies of REST payloads
(ARCHITECTURE.md, "Schema"). Fields backed by another service than their parent's are
nullable, so a failing service nulls that field, not the whole order or customer
(tests/test_nullability.py holds every relation to it).

A field that reads another entity declares its `Relation`; its resolver is the generic
`resolve` (the reference execution), and the planner reads the same declaration."""

from __future__ import annotations

import base64
import enum
from datetime import datetime
from typing import Any

import strawberry
from strawberry.types import Info

from gateway import Binding, CachePolicy, Relation, resolve
from gateway.rules import OwnedBy

Ctx = Info[Any, None]

# The entity bindings: which service answers for which type, through which batch route,
# and how long its data may be cached. Prices and stock move; authors hardly ever do.
# Personal data (customers, their orders, payments, shipments) is cached per caller.
# `parse` names its class late: the types below refer to each other.
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
# Who may read what (ARCHITECTURE.md, "Callers"): a customer, their orders, the pages of
# them, and what hangs off an order (payment, shipment) belong to that customer; staff may
# read them all; the catalog is public.
CUSTOMER = Binding("customer", "customers", "/customers", lambda p: Customer.of(p),
                   policy=CachePolicy(MINUTE, HOUR, private=True), owner="id")
BOOK = Binding("book", "catalog", "/books", lambda p: Book.of(p), policy=CachePolicy(30.0, HOUR))
AUTHOR = Binding("author", "catalog", "/authors", lambda p: Author.of(p), policy=CachePolicy(HOUR, DAY))
STOCK = Binding("stock", "inventory", "/stock", lambda p: Stock.of(p), param="bookIds", key="bookId", optional=True,
                identity=None, policy=CachePolicy(5.0, 10 * MINUTE))
ORDER = Binding("order", "orders", "/orders", lambda p: Order.of(p), policy=CachePolicy(MINUTE, HOUR, private=True),
                owner="customerId")
# Looked up by order id; their change events carry the order's id (`orderId`) besides their
# own, so the gateway's feed follower finds and invalidates these entries like any other.
PAYMENT = Binding("payment", "payments", "/payments", lambda p: Payment.of(p), param="orderIds", key="orderId",
                  optional=True, identity=None, policy=CachePolicy(15.0, HOUR, private=True), feed_key="orderId",
                  through_parent=True)
SHIPMENT = Binding("shipment", "shipping", "/shipments", lambda p: Shipment.of(p), param="orderIds", key="orderId",
                   optional=True, identity=None, policy=CachePolicy(15.0, HOUR, private=True), feed_key="orderId",
                   through_parent=True)
# The first page of many customers' orders in one call. A page moves with every order of its
# customer: order events name the customer, and drop the customer's pages (any `first`).
ORDER_PAGES = Binding("orderPage", "orders", "/orders", lambda p: OrderConnection.of(p), param="customerIds",
                      key="customerId", identity=None, owner="customerId",
                      policy=CachePolicy(MINUTE, HOUR, private=True), feed_key="customerId", follows="order")
BINDINGS = (CUSTOMER, BOOK, AUTHOR, STOCK, ORDER, PAYMENT, SHIPMENT, ORDER_PAGES)


def _time(raw: str) -> datetime:
    return datetime.fromisoformat(raw)


@strawberry.enum(description="Where an order is in its life.")
class OrderStatus(enum.Enum):
    PENDING = "PENDING"  # being checked out: stock, payment and shipment not all settled yet
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
    CANCELLED = "CANCELLED"


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

    @strawberry.field(metadata=Relation(AUTHOR, via="author_id", included="author").metadata())
    async def author(self, info: Ctx) -> Author | None:
        return await resolve(info, self)

    @strawberry.field(metadata=Relation(STOCK, via="id").metadata())
    async def stock(self, info: Ctx) -> Stock | None:
        return await resolve(info, self)

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

    @strawberry.field(description="The book as the catalog has it now.",
                      metadata=Relation(BOOK, via="book_id").metadata())
    async def book(self, info: Ctx) -> Book | None:
        return await resolve(info, self)

    @classmethod
    def of(cls, p: dict[str, Any]) -> OrderItem:
        return cls(quantity=int(p["quantity"]), unit_price=Money.of(p["unitPrice"]),
                   title_at_purchase=p["titleAtPurchase"], book_id=int(p["bookId"]))


@strawberry.type(directives=[OwnedBy(through="order")])
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


@strawberry.type(directives=[OwnedBy(through="order")])
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


@strawberry.type(directives=[OwnedBy(field="customerId")])
class Order:
    id: strawberry.ID
    status: OrderStatus
    placed_at: datetime
    total: Money
    items: list[OrderItem]
    version: int
    customer_id: strawberry.Private[int]

    @strawberry.field(metadata=Relation(CUSTOMER, via="customer_id").metadata())
    async def customer(self, info: Ctx) -> Customer | None:
        return await resolve(info, self)

    @strawberry.field(description="Null while the order is unpaid.", metadata=Relation(PAYMENT, via="id").metadata())
    async def payment(self, info: Ctx) -> Payment | None:
        return await resolve(info, self)

    @strawberry.field(description="Null until the order ships.", metadata=Relation(SHIPMENT, via="id").metadata())
    async def shipment(self, info: Ctx) -> Shipment | None:
        return await resolve(info, self)

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


def _cursor(order_id: str) -> str:
    # Our cursor is the service's cursor for "after this order"; both stay opaque.
    return base64.urlsafe_b64encode(f"order:{order_id}".encode()).decode().rstrip("=")


@strawberry.type(description="A page of orders, newest first (Relay cursor connection).")
class OrderConnection:
    edges: list[OrderEdge]
    page_info: PageInfo
    total_count: int

    @strawberry.field(description="The orders of this page, without the edges.")
    def nodes(self) -> list[Order]:
        return [edge.node for edge in self.edges]

    @classmethod
    def of(cls, page: dict[str, Any]) -> OrderConnection:
        if not isinstance(page["data"], list):
            raise TypeError("a page's data must be a list")
        orders = [Order.of(o) for o in page["data"]]
        cursor = page["nextCursor"]
        if cursor is not None and not isinstance(cursor, str):
            raise TypeError("nextCursor must be a string or null")
        return cls(edges=[OrderEdge(cursor=_cursor(order.id), node=order) for order in orders],
                   page_info=PageInfo(has_next_page=cursor is not None, end_cursor=cursor),
                   total_count=int(page["totalCount"]))


@strawberry.type(directives=[OwnedBy(field="id")])
class Customer:
    id: strawberry.ID
    name: str
    email: str
    tier: str
    version: int

    # Nullable: the orders service backs it, not the customers service (ARCHITECTURE.md,
    # "Schema"); with orders down, the customer keeps its name and tier (issue 25).
    @strawberry.field(description="This customer's orders, newest first (null, with the error at its path, when "
                                  "the orders service cannot answer).",
                      metadata=Relation(ORDER_PAGES, via="id", paged=True).metadata())
    async def orders(self, info: Ctx, first: int = 10, after: str | None = None) -> OrderConnection | None:
        return await resolve(info, self, first=first, after=after)

    @classmethod
    def of(cls, p: dict[str, Any]) -> Customer:
        return cls(id=strawberry.ID(str(p["id"])), name=p["name"], email=p["email"], tier=p["tier"], version=p["version"])
