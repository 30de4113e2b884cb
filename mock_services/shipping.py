"""shipping: at most one live (not CANCELLED) shipment per order, looked up by the order's id."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Column, Index, MetaData, String, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from . import models
from .api import Api, path_param
from .app import ServiceSpec
from .context import context
from .db import BigId, EventKey, add_outbox, now_iso
from .demo_data import CARRIERS, Shop
from .errors import NotFound
from .idempotency import IDEMPOTENCY_HEADER, Outcome, add_idempotency_keys, idempotent
from .params import parse_id, read_body
from .resource import Entity, add_reads, etag_of, versioned_table

__all__ = ["SPEC"]

metadata = MetaData()
add_outbox(metadata)
add_idempotency_keys(metadata)
shipments = versioned_table(
    "shipments", metadata,
    Column("id", BigId, primary_key=True), Column("order_id", BigId, nullable=False),
    Column("carrier", String, nullable=False), Column("tracking_number", String, nullable=False),
    Column("status", String, nullable=False), Column("estimated_delivery", String, nullable=False),
    Column("address", JSON, nullable=True),  # null for the demo data's shipments
)
Index("one_live_shipment_per_order", shipments.c.order_id, unique=True,
      sqlite_where=shipments.c.status != "CANCELLED", postgresql_where=shipments.c.status != "CANCELLED")
Index("shipments_by_order", shipments.c.order_id)
SHIPMENT = Entity("shipment", shipments, lambda r: {
    "id": r.id, "orderId": r.order_id, "carrier": r.carrier, "trackingNumber": r.tracking_number,
    "status": r.status, "estimatedDelivery": r.estimated_delivery, "version": r.version, "updatedAt": r.updated_at,
}, models.Shipment)


def _shipment(row: Any, status: int = 200) -> Outcome:
    return Outcome(status, SHIPMENT.to_json(row), {"ETag": etag_of(row.version)})


async def create(request: Request) -> Response:
    body = await read_body(request, models.ShipmentCreate)
    db = context(request).db

    async def effect(conn: AsyncConnection) -> Outcome:
        live = (await conn.execute(select(shipments.c.id).where(
            shipments.c.order_id == body.orderId, shipments.c.status != "CANCELLED"))).first()
        if live is not None:
            return Outcome.error(409, "SHIPMENT_EXISTS", f"order {body.orderId} already has shipment {live.id}")
        now = now_iso()
        row = (await conn.execute(insert(shipments).values(
            order_id=body.orderId, carrier=CARRIERS[zlib.crc32(str(body.orderId).encode()) % len(CARRIERS)],
            tracking_number="", status="PENDING", address=body.address.model_dump(),
            estimated_delivery=(datetime.now(UTC) + timedelta(days=3)).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            version=1, updated_at=now,
        ).returning(*shipments.c))).one()
        # The tracking number follows from the id, known only now.
        row = (await conn.execute(update(shipments).where(shipments.c.id == row.id).values(
            tracking_number=f"BV{row.id:010d}").returning(*shipments.c))).one()
        await db.emit(conn, "shipment", "created", row.id, 1, now)
        outcome = _shipment(row, 201)
        outcome.headers["Location"] = f"/shipments/{row.id}"
        return outcome

    return await idempotent(request, body.model_dump(), effect)


async def cancel(request: Request) -> Response:
    key = parse_id(request.path_params["id"], "id")
    db = context(request).db

    async def effect(conn: AsyncConnection) -> Outcome:
        row = (await conn.execute(select(shipments).where(shipments.c.id == key))).first()
        if row is None:
            raise NotFound(f"shipment {key} not found")
        if row.status == "CANCELLED":
            return _shipment(row)
        if row.status != "PENDING":  # it left the warehouse
            return Outcome.error(409, "NOT_CANCELLABLE", f"shipment {key} is {row.status}")
        now = now_iso()
        row = (await conn.execute(update(shipments).where(shipments.c.id == key).values(
            status="CANCELLED", version=shipments.c.version + 1, updated_at=now).returning(*shipments.c))).one()
        await db.emit(conn, "shipment", "cancelled", key, row.version, now)
        return _shipment(row)

    return await idempotent(request, None, effect)


def routes(api: Api) -> None:
    add_reads(api, SHIPMENT, "/shipments", "id", batch_param="orderIds", batch_column="order_id")
    api.add("POST", "/shipments", create, summary="Create the shipment of an order",
            params=[IDEMPOTENCY_HEADER], body=models.ShipmentCreate, ok=(201, models.Shipment), errors=(400, 409, 422))
    api.add("POST", "/shipments/{id}/cancel", cancel, summary="Cancel a shipment that has not left",
            params=[path_param("id"), IDEMPOTENCY_HEADER], ok=(200, models.Shipment), errors=(400, 404, 409, 422))


def seed(shop: Shop) -> dict:
    return {shipments: shop.shipments}


SPEC = ServiceSpec("shipping", 8106, ("shipment",), metadata, routes, seed,
                   event_keys=(EventKey("shipment", "orderId", shipments.c.id, shipments.c.order_id),))
