"""customers: who buys. Private data (names, emails); the gateway scopes it per caller."""

from sqlalchemy import Column, MetaData, String

from . import models
from .api import Api
from .app import ServiceSpec
from .db import BigId, add_outbox
from .demo_data import Shop
from .resource import Entity, add_patch, add_reads, changes, versioned_table

metadata = MetaData()
add_outbox(metadata)
customers = versioned_table(
    "customers", metadata,
    Column("id", BigId, primary_key=True), Column("name", String, nullable=False),
    Column("email", String, nullable=False), Column("tier", String, nullable=False),
)
CUSTOMER = Entity("customer", customers, lambda r: {
    "id": r.id, "name": r.name, "email": r.email, "tier": r.tier, "version": r.version, "updatedAt": r.updated_at,
}, models.Customer)


def routes(api: Api) -> None:
    add_reads(api, CUSTOMER, "/customers", "id")
    add_patch(api, CUSTOMER, "/customers", "id", models.CustomerPatch, changes)


def seed(shop: Shop) -> dict:
    return {customers: shop.customers}


SPEC = ServiceSpec("customers", 8101, ("customer",), metadata, routes, seed)
