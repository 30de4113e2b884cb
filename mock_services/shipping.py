"""shipping: at most one shipment per order, looked up by the order's id."""

from sqlalchemy import Column, Integer, MetaData, String

from . import models
from .api import Api
from .app import ServiceSpec
from .db import add_outbox
from .demo_data import Shop
from .resource import Entity, add_reads, versioned_table

metadata = MetaData()
add_outbox(metadata)
shipments = versioned_table(
    "shipments", metadata,
    Column("id", Integer, primary_key=True), Column("order_id", Integer, nullable=False, unique=True),
    Column("carrier", String, nullable=False), Column("tracking_number", String, nullable=False),
    Column("status", String, nullable=False), Column("estimated_delivery", String, nullable=False),
)
SHIPMENT = Entity("shipment", shipments, lambda r: {
    "id": r.id, "orderId": r.order_id, "carrier": r.carrier, "trackingNumber": r.tracking_number,
    "status": r.status, "estimatedDelivery": r.estimated_delivery, "version": r.version, "updatedAt": r.updated_at,
}, models.Shipment)


def routes(api: Api) -> None:
    add_reads(api, SHIPMENT, "/shipments", "id", batch_param="orderIds", batch_column="order_id")


def seed(shop: Shop) -> dict:
    return {shipments: shop.shipments}


SPEC = ServiceSpec("shipping", 8106, ("shipment",), metadata, routes, seed)
