"""Wire shapes of the services: request bodies are validated with these, and the
OpenAPI documents are generated from them, so the two cannot drift apart."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .patterns import Pattern

# Every pattern is ECMA-262 and checked as such (mock_services/patterns.py).
AMOUNT = Pattern(r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,2})?$")
# The largest amount AMOUNT allows, in cents: every amount a service stores or computes
# (prices, order totals, payments) is checked against it before it is written (mock_services/money.py).
MAX_CENTS = 999_999_999_99
MAX_ID = 10**18 - 1  # the largest id a path or ?ids= accepts (params.parse_id); fits SQLite's INTEGER
Tier = Literal["standard", "silver", "gold"]
# PENDING: under checkout (the saga has not settled yet); PLACED: placed without a checkout.
OrderStatus = Literal["PENDING", "PLACED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED"]
PaymentStatus = Literal["PENDING", "CAPTURED", "REFUNDED", "FAILED"]
ShipmentStatus = Literal["PENDING", "IN_TRANSIT", "DELIVERED", "RETURNED", "CANCELLED"]
ReservationStatus = Literal["HELD", "CONFIRMED", "RELEASED", "EXPIRED"]
CheckoutStatus = Literal["RUNNING", "COMPENSATING", "COMPLETED", "CANCELLED"]
METHOD = Pattern(r"^[a-z][a-z0-9-]{0,31}$")
# Free text kept in a text column: no U+0000, which PostgreSQL's text type cannot hold (its
# docs, "Character Types"), so it is a 400 on both backends instead of a 500 on one.
TEXT = Pattern(r"^[^\x00]*$")
# \s is ECMA-262's WhiteSpace and LineTerminator here, as for a client checking the document.
EMAIL = Pattern(r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+$")
CURRENCY = Pattern(r"^[A-Z]{3}$")
COUNTRY = Pattern(r"^[A-Z]{2}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Money(Strict):
    amount: Annotated[str, AMOUNT] = Field(description="Decimal string, never negative, at most 999999999.99")
    currency: Annotated[str, CURRENCY]


class Versioned(Strict):
    version: int = Field(ge=1)
    updatedAt: datetime


class Customer(Versioned):
    id: int
    name: str
    email: str
    tier: Tier


class Author(Versioned):
    id: int
    name: str
    bio: str


class Book(Versioned):
    id: int
    title: str
    isbn: str
    authorId: int
    price: Money
    publishedYear: int


class Stock(Versioned):
    bookId: int
    available: int = Field(ge=0)
    warehouse: str


class OrderItem(Strict):
    bookId: int = Field(ge=1, le=MAX_ID)
    quantity: int = Field(ge=1, le=1000)
    unitPrice: Money
    titleAtPurchase: str = Field(min_length=1, max_length=500)


class Order(Versioned):
    id: int
    customerId: int
    status: OrderStatus
    placedAt: datetime
    total: Money
    items: list[OrderItem]


class Payment(Versioned):
    id: int
    orderId: int
    amount: Money
    method: str
    status: PaymentStatus


class Shipment(Versioned):
    id: int
    orderId: int
    carrier: str
    trackingNumber: str
    status: ShipmentStatus
    estimatedDelivery: datetime


# PATCH fields are optional but never null: the default (absent) is not validated, an
# explicit null is refused, and the document says so (no `null` in their types).
def _patch_schema(schema: dict[str, Any], model: type) -> None:
    schema["minProperties"] = 1  # an empty PATCH is a 400
    for field in schema.get("properties", {}).values():
        field.pop("default", None)  # absent, not null


class CustomerPatch(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_patch_schema)
    name: Annotated[str, TEXT] = Field(None, min_length=1, max_length=200)  # type: ignore[assignment]
    email: Annotated[str, EMAIL] = Field(None, max_length=254)  # type: ignore[assignment]
    tier: Tier = None  # type: ignore[assignment]


class BookPatch(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_patch_schema)
    title: Annotated[str, TEXT] = Field(None, min_length=1, max_length=500)  # type: ignore[assignment]
    price: Money = None  # type: ignore[assignment]


class StockPatch(Strict):
    available: int = Field(ge=0, le=10_000_000)


class OrderPatch(Strict):
    status: OrderStatus


class OrderCreate(Strict):
    customerId: int = Field(ge=1, le=MAX_ID)
    items: list[OrderItem] = Field(min_length=1, max_length=100)


class LineItem(Strict):
    bookId: int = Field(ge=1, le=MAX_ID)
    quantity: int = Field(ge=1, le=1000)


class ReservationCreate(Strict):
    items: list[LineItem] = Field(min_length=1, max_length=100)
    orderId: int | None = Field(None, ge=1, le=MAX_ID)


class Reservation(Versioned):
    id: int
    orderId: int | None
    status: ReservationStatus
    items: list[LineItem]
    expiresAt: datetime


class PaymentCreate(Strict):
    orderId: int = Field(ge=1, le=MAX_ID)
    amount: Money
    method: Annotated[str, METHOD] = Field(description='"card-declined" is always declined (402 PAYMENT_DECLINED)')


class Address(Strict):
    name: str = Field(min_length=1, max_length=200)
    street: str = Field(min_length=1, max_length=200)
    city: str = Field(min_length=1, max_length=100)
    postalCode: str = Field(min_length=1, max_length=20)
    country: Annotated[str, COUNTRY]


class ShipmentCreate(Strict):
    orderId: int = Field(ge=1, le=MAX_ID)
    address: Address


class CheckoutCreate(Strict):
    customerId: int = Field(ge=1, le=MAX_ID)
    items: list[LineItem] = Field(min_length=1, max_length=100)
    shippingAddress: Address
    paymentMethod: Annotated[str, METHOD]


class Checkout(Strict):
    id: int
    orderId: int
    status: CheckoutStatus
    step: str | None = Field(description="The step running or next to run; null once settled")
    reason: str | None = Field(description="Why the order was cancelled (OUT_OF_STOCK, PAYMENT_DECLINED, ...)")
    compensationsOwed: list[str]
    reservationId: int | None
    paymentId: int | None
    shipmentId: int | None
    attempts: int = Field(ge=0, description="Step calls that failed and were tried again")
    updatedAt: datetime


class Event(Strict):
    seq: int
    type: str
    entity: str
    id: int
    version: int
    at: datetime
    orderId: int | None = Field(None, description="payment and shipment events: the order the entity belongs "
                                                 "to, the key readers look it up by")
    customerId: int | None = Field(None, description="order events: the order's customer, whose pages of orders "
                                                    "it changes")


class EventPage(Strict):
    events: list[Event]
    next: int = Field(description="Pass as `after` to read on")
    latest: int = Field(description="Highest seq the service has written")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[dict[str, str]] | None = None


class Error(Strict):
    error: ErrorDetail


class Meta(Strict):
    service: str
    maxBatch: int
    entities: list[str]
