"""inventory: stock per book, keyed by the catalog's book id (an id, never a join)."""

from sqlalchemy import Column, Integer, MetaData, String

from . import models
from .api import Api
from .app import ServiceSpec
from .db import add_outbox
from .demo_data import Shop
from .resource import Entity, add_patch, add_reads, changes, versioned_table

metadata = MetaData()
add_outbox(metadata)
stock = versioned_table(
    "stock", metadata,
    Column("book_id", Integer, primary_key=True), Column("available", Integer, nullable=False),
    Column("warehouse", String, nullable=False),
)
STOCK = Entity("stock", stock, lambda r: {
    "bookId": r.book_id, "available": r.available, "warehouse": r.warehouse, "version": r.version, "updatedAt": r.updated_at,
}, models.Stock, key="book_id")


def routes(api: Api) -> None:
    add_reads(api, STOCK, "/stock", "bookId", batch_param="bookIds")
    add_patch(api, STOCK, "/stock", "bookId", models.StockPatch, changes)


def seed(shop: Shop) -> dict:
    return {stock: shop.stock}


SPEC = ServiceSpec("inventory", 8103, ("stock",), metadata, routes, seed)
