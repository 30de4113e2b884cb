"""Wire shapes of the services: request bodies are validated with these, and the
OpenAPI documents are generated from them, so the two cannot drift apart."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AMOUNT = r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,2})?$"
MAX_ID = 10**18 - 1  # the largest id a path or ?ids= accepts (params.parse_id); fits SQLite's INTEGER
Tier = Literal["standard", "silver", "gold"]
OrderStatus = Literal["PLACED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED"]
PaymentStatus = Literal["PENDING", "CAPTURED", "REFUNDED", "FAILED"]
ShipmentStatus = Literal["PENDING", "IN_TRANSIT", "DELIVERED", "RETURNED"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Money(Strict):
    amount: str = Field(pattern=AMOUNT, description="Decimal string, never negative")
    currency: str = Field(pattern=r"^[A-Z]{3}$")


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


class CustomerPatch(Strict):
    name: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)
    tier: Tier | None = None


class BookPatch(Strict):
    title: str | None = Field(None, min_length=1, max_length=500)
    price: Money | None = None


class StockPatch(Strict):
    available: int = Field(ge=0, le=10_000_000)


class OrderPatch(Strict):
    status: OrderStatus


class OrderCreate(Strict):
    customerId: int = Field(ge=1, le=MAX_ID)
    items: list[OrderItem] = Field(min_length=1, max_length=100)


class Event(Strict):
    seq: int
    type: str
    entity: str
    id: int
    version: int
    at: datetime


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
