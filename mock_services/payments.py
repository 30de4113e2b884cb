"""payments: at most one live (PENDING or CAPTURED) payment per order, looked up by the
order's id. A capture either succeeds or is declined; a declined one is kept as FAILED."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Index, MetaData, String, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from . import models
from .api import Api, path_param
from .app import ServiceSpec
from .context import context
from .db import BigId, EventKey, add_outbox, now_iso
from .demo_data import Shop
from .errors import NotFound
from .idempotency import IDEMPOTENCY_HEADER, Outcome, add_idempotency_keys, idempotent
from .params import cents, money, parse_id, read_body
from .resource import Entity, add_reads, etag_of, versioned_table

__all__ = ["SPEC", "DECLINED_METHOD"]

# A test card: a capture with this method is always declined (README, "Checkout").
DECLINED_METHOD = "card-declined"
LIVE = ("PENDING", "CAPTURED")

metadata = MetaData()
add_outbox(metadata)
add_idempotency_keys(metadata)
payments = versioned_table(
    "payments", metadata,
    Column("id", BigId, primary_key=True), Column("order_id", BigId, nullable=False),
    Column("amount_cents", BigId, nullable=False), Column("currency", String, nullable=False),
    Column("method", String, nullable=False), Column("status", String, nullable=False),
)
# The database itself refuses a second live payment for an order (a partial unique index).
Index("one_live_payment_per_order", payments.c.order_id, unique=True,
      sqlite_where=payments.c.status.in_(LIVE), postgresql_where=payments.c.status.in_(LIVE))
Index("payments_by_order", payments.c.order_id)
PAYMENT = Entity("payment", payments, lambda r: {
    "id": r.id, "orderId": r.order_id, "amount": money(r.amount_cents, r.currency), "method": r.method,
    "status": r.status, "version": r.version, "updatedAt": r.updated_at,
}, models.Payment)


def _payment(row: Any, status: int = 200) -> Outcome:
    return Outcome(status, PAYMENT.to_json(row), {"ETag": etag_of(row.version)})


async def capture(request: Request) -> Response:
    body = await read_body(request, models.PaymentCreate)
    db = context(request).db

    async def effect(conn: AsyncConnection) -> Outcome:
        live = (await conn.execute(select(payments.c.id).where(
            payments.c.order_id == body.orderId, payments.c.status.in_(LIVE)))).first()
        if live is not None:
            return Outcome.error(409, "PAYMENT_EXISTS", f"order {body.orderId} already has payment {live.id}")
        now = now_iso()
        declined = body.method == DECLINED_METHOD
        row = (await conn.execute(insert(payments).values(
            order_id=body.orderId, amount_cents=cents(body.amount.amount), currency=body.amount.currency,
            method=body.method, status="FAILED" if declined else "CAPTURED", version=1, updated_at=now,
        ).returning(*payments.c))).one()
        await db.emit(conn, "payment", "created", row.id, 1, now)
        if declined:
            return Outcome.error(402, "PAYMENT_DECLINED", f"the payment of order {body.orderId} was declined",
                                 [{"paymentId": str(row.id), "status": "FAILED"}])
        outcome = _payment(row, 201)
        outcome.headers["Location"] = f"/payments/{row.id}"
        return outcome

    return await idempotent(request, body.model_dump(), effect)


async def refund(request: Request) -> Response:
    key = parse_id(request.path_params["id"], "id")
    db = context(request).db

    async def effect(conn: AsyncConnection) -> Outcome:
        row = (await conn.execute(select(payments).where(payments.c.id == key))).first()
        if row is None:
            raise NotFound(f"payment {key} not found")
        if row.status == "REFUNDED":
            return _payment(row)
        if row.status != "CAPTURED":
            return Outcome.error(409, "NOT_REFUNDABLE", f"payment {key} is {row.status}")
        now = now_iso()
        row = (await conn.execute(update(payments).where(payments.c.id == key).values(
            status="REFUNDED", version=payments.c.version + 1, updated_at=now).returning(*payments.c))).one()
        await db.emit(conn, "payment", "refunded", key, row.version, now)
        return _payment(row)

    return await idempotent(request, None, effect)


def routes(api: Api) -> None:
    add_reads(api, PAYMENT, "/payments", "id", batch_param="orderIds", batch_column="order_id")
    api.add("POST", "/payments", capture, summary="Capture a payment for an order (402 PAYMENT_DECLINED when declined)",
            params=[IDEMPOTENCY_HEADER], body=models.PaymentCreate, ok=(201, models.Payment), errors=(400, 402, 409, 422))
    api.add("POST", "/payments/{id}/refund", refund, summary="Refund a captured payment",
            params=[path_param("id"), IDEMPOTENCY_HEADER], ok=(200, models.Payment), errors=(400, 404, 409, 422))


def seed(shop: Shop) -> dict:
    return {payments: shop.payments}


SPEC = ServiceSpec("payments", 8105, ("payment",), metadata, routes, seed,
                   event_keys=(EventKey("payment", "orderId", payments.c.id, payments.c.order_id),))
