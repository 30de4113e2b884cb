"""payments: at most one live (PENDING or CAPTURED) payment per order, looked up by the
order's id. A capture either succeeds or is declined; a declined one is kept as FAILED.

A caller that does not know whether its capture happened (no answer came) asks by its
Idempotency-Key, `POST /payment-voids`: what the capture came to, and if it never arrived,
the key is voided, so that it never captures when it arrives late (issue 24)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from sqlalchemy import Column, Index, MetaData, String, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from . import models
from .api import Api, path_param
from .app import ServiceSpec
from .context import context
from .db import BigId, EventKey, add_outbox, now_iso
from .demo_data import Shop
from .errors import Conflict, NotFound, Unprocessable, error_body
from .idempotency import IDEMPOTENCY_HEADER, Outcome, add_idempotency_keys, fingerprint, idempotent
from .params import cents, money, parse_id, read_body
from .patterns import IDEMPOTENCY_KEY
from .responses import JSONResponse
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


class PaymentVoid(models.Strict):
    """What a caller may have sent to POST /payments without getting an answer."""

    key: Annotated[str, IDEMPOTENCY_KEY] = Field(description="The Idempotency-Key the capture was sent with")
    payment: models.PaymentCreate = Field(description="The capture's body, as it was sent")


class PaymentVoided(models.Strict):
    key: str
    outcome: Literal["VOIDED", "CREATED", "REFUSED"] = Field(description=(
        "VOIDED: no capture arrived with the key, and none will be made with it (a late one is refused, 409 "
        "PAYMENT_VOIDED); CREATED: the capture was made, `payment` is it as it is now (refund it if CAPTURED); "
        "REFUSED: the capture was refused (declined, with its FAILED payment, or another payment was live)"))
    payment: models.Payment | None


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


async def void(request: Request) -> Response:
    """What the capture sent with a key came to; if none arrived, void the key: its record is
    written as a refusal (409 PAYMENT_VOIDED) for exactly that request, which a capture arriving
    late then replays instead of capturing (mock_services/idempotency.py)."""
    body = await read_body(request, PaymentVoid)
    db = context(request).db
    keys = db.metadata.tables["idempotency_keys"]
    stamp = fingerprint("POST", "/payments", body.payment.model_dump())  # as `capture` stores it
    for attempt in range(2):
        try:
            async with db.write() as conn:
                prior = (await conn.execute(select(keys).where(keys.c.key == body.key))).first()
                if prior is None:
                    await conn.execute(insert(keys).values(
                        key=body.key, fingerprint=stamp, status=409, headers={}, created_at=now_iso(),
                        body=error_body("PAYMENT_VOIDED", f"the payment of order {body.payment.orderId} was voided "
                                                          "before it was made")))
                    return JSONResponse({"key": body.key, "outcome": "VOIDED", "payment": None})
                if prior.fingerprint != stamp:
                    raise Unprocessable("this Idempotency-Key was used with another request", code="IDEMPOTENCY_KEY_REUSED")
                if prior.status == 201:
                    outcome, made = "CREATED", prior.body["id"]
                elif prior.body["error"]["code"] == "PAYMENT_VOIDED":
                    return JSONResponse({"key": body.key, "outcome": "VOIDED", "payment": None})
                else:  # declined (its FAILED payment in the details) or PAYMENT_EXISTS
                    outcome = "REFUSED"
                    made = next((int(d["paymentId"]) for d in prior.body["error"].get("details") or [] if "paymentId" in d),
                                None)
                row = (await conn.execute(select(payments).where(payments.c.id == made))).first() if made else None
            return JSONResponse({"key": body.key, "outcome": outcome, "payment": PAYMENT.to_json(row) if row else None})
        except IntegrityError as exc:
            # A capture with the key committed first (another process): read what it made.
            if attempt:
                raise Conflict("the request conflicted with a concurrent one; send it again") from exc
    raise AssertionError("unreachable")


def routes(api: Api) -> None:
    add_reads(api, PAYMENT, "/payments", "id", batch_param="orderIds", batch_column="order_id")
    api.add("POST", "/payments", capture, summary="Capture a payment for an order (402 PAYMENT_DECLINED when declined)",
            params=[IDEMPOTENCY_HEADER], body=models.PaymentCreate, ok=(201, models.Payment), errors=(400, 402, 409, 422))
    # Not under /payments/: /payments/{id} would take its GET (a 400 for the id "voids", not a 405).
    api.add("POST", "/payment-voids", void, summary="What a capture sent with a key came to; void the key if it never "
            "arrived", body=PaymentVoid, ok=(200, PaymentVoided), errors=(400, 409, 422))
    api.add("POST", "/payments/{id}/refund", refund, summary="Refund a captured payment",
            params=[path_param("id"), IDEMPOTENCY_HEADER], ok=(200, models.Payment), errors=(400, 404, 409, 422))


def seed(shop: Shop) -> dict:
    return {payments: shop.payments}


SPEC = ServiceSpec("payments", 8105, ("payment",), metadata, routes, seed,
                   event_keys=(EventKey("payment", "orderId", payments.c.id, payments.c.order_id),))
