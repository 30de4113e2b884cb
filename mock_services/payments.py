"""payments: at most one payment per order, looked up by the order's id."""

from sqlalchemy import Column, Integer, MetaData, String

from . import models
from .api import Api
from .app import ServiceSpec
from .db import add_outbox
from .demo_data import Shop
from .params import money
from .resource import Entity, add_reads, versioned_table

metadata = MetaData()
add_outbox(metadata)
payments = versioned_table(
    "payments", metadata,
    Column("id", Integer, primary_key=True), Column("order_id", Integer, nullable=False, unique=True),
    Column("amount_cents", Integer, nullable=False), Column("currency", String, nullable=False),
    Column("method", String, nullable=False), Column("status", String, nullable=False),
)
PAYMENT = Entity("payment", payments, lambda r: {
    "id": r.id, "orderId": r.order_id, "amount": money(r.amount_cents, r.currency), "method": r.method,
    "status": r.status, "version": r.version, "updatedAt": r.updated_at,
}, models.Payment)


def routes(api: Api) -> None:
    add_reads(api, PAYMENT, "/payments", "id", batch_param="orderIds", batch_column="order_id")


def seed(shop: Shop) -> dict:
    return {payments: shop.payments}


SPEC = ServiceSpec("payments", 8105, ("payment",), metadata, routes, seed)
