"""The root Mutation (ARCHITECTURE.md, "Writes"): placing an order runs the orders service's
checkout saga (README, "Checkout"); cancelling one runs its compensations. Input is
checked before anything is written; what the saga answers is mapped to error codes here,
once; the write path itself (customer, idempotency key, call, cache eviction) is
`gateway.writes`."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import strawberry

from gateway import BadUserInput, GatewayError, NotFound, Relation, resolve
from gateway.errors import OutOfStock, PaymentDeclined, Refused, UpstreamError, UpstreamUnavailable
from gateway.relations import int_id
from gateway.source import Stale, contract
from gateway.writes import customer_of, evict, scoped_key, send

from .types import BOOK, CUSTOMER, ORDER, ORDER_PAGES, PAYMENT, SHIPMENT, STOCK, Ctx, Order, OrderStatus

__all__ = ["Mutation", "PlaceOrderInput", "PlaceOrderResult", "AddressInput", "OrderItemInput"]

# The orders service's own limits (POST /checkouts), checked here so that bad input is
# refused with BAD_USER_INPUT before anything is sent.
MAX_ITEMS = 100
MAX_QUANTITY = 1000
_METHOD = re.compile(r"[a-z][a-z0-9-]{0,31}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_ADDRESS_LIMITS = {"name": 200, "street": 200, "city": 100, "postalCode": 20}
# A checkout's status, as the order's.
_STATUS = {"COMPLETED": OrderStatus.PAID, "CANCELLED": OrderStatus.CANCELLED,
           "RUNNING": OrderStatus.PENDING, "COMPENSATING": OrderStatus.PENDING}


@strawberry.input
class OrderItemInput:
    book_id: strawberry.ID
    quantity: int = strawberry.field(description=f"1 to {MAX_QUANTITY} copies")


@strawberry.input(description="Where the order is shipped; every field is required and not blank.")
class AddressInput:
    name: str
    street: str
    city: str
    postal_code: str
    country: str = strawberry.field(description="ISO 3166-1 alpha-2 code, e.g. NL")


@strawberry.input
class PlaceOrderInput:
    items: list[OrderItemInput] = strawberry.field(description=f"1 to {MAX_ITEMS} lines")
    shipping_address: AddressInput
    payment_method: str = strawberry.field(description='e.g. "card"; "card-declined" is always declined')
    customer_id: strawberry.ID | None = strawberry.field(
        default=None, description="The customer ordering: staff only; a customer's token already says who they are")


@strawberry.type(description="What a checkout came to within the request's time: the order PAID, or still PENDING "
                             "(query the order again), or CANCELLED with the reason.")
class PlaceOrderResult:
    checkout_id: strawberry.ID
    status: OrderStatus
    reason: str | None = strawberry.field(description="Why the order is (being) cancelled, e.g. CANCELLED_BY_CUSTOMER")
    order_id: strawberry.Private[int]

    @strawberry.field(metadata=Relation(ORDER, via="order_id").metadata())
    async def order(self, info: Ctx) -> Order | None:
        return await resolve(info, self)


def _items(raw: list[OrderItemInput]) -> list[dict[str, int]]:
    if not raw:
        raise BadUserInput("an order needs at least one item")
    if len(raw) > MAX_ITEMS:
        raise BadUserInput(f"an order has at most {MAX_ITEMS} lines, got {len(raw)}")
    items = []
    for item in raw:
        if not 1 <= item.quantity <= MAX_QUANTITY:
            raise BadUserInput(f"quantity must be from 1 to {MAX_QUANTITY}, got {item.quantity}")
        items.append({"bookId": int_id(item.book_id, "bookId"), "quantity": item.quantity})
    return items


def _address(raw: AddressInput) -> dict[str, str]:
    address = {"name": raw.name.strip(), "street": raw.street.strip(), "city": raw.city.strip(),
               "postalCode": raw.postal_code.strip(), "country": raw.country.strip()}
    for field, limit in _ADDRESS_LIMITS.items():
        if not 1 <= len(address[field]) <= limit:
            raise BadUserInput(f"shippingAddress.{field} is required, at most {limit} characters")
    if not _COUNTRY.fullmatch(address["country"]):
        raise BadUserInput("shippingAddress.country must be a two-letter code such as NL")
    return address


def _value(found: Any) -> Any:
    """An entity read through the source; its error raised (stale data is still data)."""
    if isinstance(found, GatewayError):
        raise found
    return found.value if isinstance(found, Stale) else found


async def _known(info: Ctx, customer: int, book_ids: list[int]) -> None:
    """The customer and every book exist (read through the entity source, cached as any read)."""
    reader = info.context.reader
    books, customers = await asyncio.gather(reader.read(BOOK, book_ids), reader.read(CUSTOMER, [customer]))
    if isinstance(customers[customer], NotFound):
        raise BadUserInput(f"no such customer: {customer}")
    unknown = [str(b) for b in book_ids if isinstance(books[b], NotFound)]
    if unknown:
        raise BadUserInput(f"no such book: {', '.join(unknown)}")
    _value(customers[customer])
    for book in book_ids:
        _value(books[book])


def _changed_by(order_id: int, customer: int, book_ids: list[int]) -> list[tuple[Any, list[int]]]:
    """What an order's checkout or cancellation changes: the order, its payment and
    shipment, its books' stock, its customer's pages of orders."""
    return [(ORDER, [order_id]), (PAYMENT, [order_id]), (SHIPMENT, [order_id]), (STOCK, book_ids),
            (ORDER_PAGES, [customer])]


def _outcome(checkout: dict[str, Any]) -> PlaceOrderResult:
    """The saga's answer as the result; a cancellation the caller can act on is its error."""
    with contract("orders", "checkout"):
        result = PlaceOrderResult(checkout_id=strawberry.ID(str(checkout["id"])), status=_STATUS[checkout["status"]],
                                  reason=checkout["reason"], order_id=int(checkout["orderId"]))
    if result.status is not OrderStatus.CANCELLED:
        return result
    details = {"orderId": str(result.order_id), "orderStatus": "CANCELLED", "reason": result.reason}
    reason = result.reason or ""
    if reason == "OUT_OF_STOCK":
        raise OutOfStock("not enough stock for this order; it was cancelled and nothing was charged",
                         service="inventory", details=details)
    if reason == "PAYMENT_DECLINED":
        raise PaymentDeclined("the payment was declined; the order was cancelled and its stock released",
                              service="payments", details=details)
    if reason.endswith("_UNAVAILABLE"):
        service = reason.removesuffix("_UNAVAILABLE").lower()
        raise Refused(f"{service} could not be reached; the order was cancelled and undone, try again",
                      service=service, code=UpstreamUnavailable.code, details=details)
    return result  # cancelled since (a repeated key after cancelOrder): the order as it is


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Check out: reserve stock, take payment, ship. The same idempotencyKey "
                                     "(per customer) always answers the same order and never charges twice.")
    async def place_order(self, info: Ctx, input: PlaceOrderInput, idempotency_key: str) -> PlaceOrderResult | None:
        context = info.context
        customer = customer_of(context, input.customer_id)
        items = _items(input.items)
        address = _address(input.shipping_address)
        if not _METHOD.fullmatch(input.payment_method):
            raise BadUserInput("paymentMethod must be lowercase letters, digits and dashes, e.g. card")
        key = scoped_key(customer, idempotency_key)
        book_ids = list(dict.fromkeys(item["bookId"] for item in items))
        await _known(info, customer, book_ids)
        try:
            checkout = await send(context, "orders", "POST", "/checkouts", key=key, json={
                "customerId": customer, "items": items, "shippingAddress": address,
                "paymentMethod": input.payment_method})
        except UpstreamError:
            # The answer is lost, not the checkout: it may be under way. Forget what it
            # may change that is known without its order id.
            await evict(context, [(STOCK, book_ids), (ORDER_PAGES, [customer])])
            raise
        with contract("orders", "checkout"):
            order_id = int(checkout["orderId"])
        await evict(context, _changed_by(order_id, customer, book_ids))
        return _outcome(checkout)

    @strawberry.mutation(description="Cancel a placed or paid order: refunded, shipment cancelled, stock given back.")
    async def cancel_order(self, info: Ctx, id: strawberry.ID) -> Order | None:
        context = info.context
        order_id = int_id(id)
        # The read checks who may see the order (its customer, or staff): FORBIDDEN otherwise.
        found = (await context.reader.read(ORDER, [order_id]))[order_id]
        order: Order = _value(found)
        customer = order.customer_id
        answer = await send(context, "orders", "POST", f"/orders/{order_id}/cancel", route="/orders/{id}/cancel")
        await evict(context, _changed_by(order_id, customer, [item.book_id for item in order.items]))
        with contract("orders", "order"):
            return Order.of(answer)
