"""catalog: books and their authors."""

from typing import Any

from sqlalchemy import Column, ForeignKey, Integer, MetaData, String

from . import models
from .api import Api
from .app import ServiceSpec
from .db import BigId, add_outbox
from .demo_data import Shop
from .money import CENTS
from .params import cents, money
from .resource import Entity, Include, add_patch, add_reads, changes, versioned_table

metadata = MetaData()
add_outbox(metadata)
authors = versioned_table(
    "authors", metadata,
    Column("id", BigId, primary_key=True), Column("name", String, nullable=False), Column("bio", String, nullable=False),
)
books = versioned_table(
    "books", metadata,
    Column("id", BigId, primary_key=True), Column("title", String, nullable=False), Column("isbn", String, nullable=False),
    Column("author_id", BigId, ForeignKey("authors.id"), nullable=False),
    Column("price_cents", CENTS, nullable=False), Column("currency", String, nullable=False),
    Column("published_year", Integer, nullable=False),
)
AUTHOR = Entity("author", authors, lambda r: {
    "id": r.id, "name": r.name, "bio": r.bio, "version": r.version, "updatedAt": r.updated_at,
}, models.Author)
BOOK = Entity("book", books, lambda r: {
    "id": r.id, "title": r.title, "isbn": r.isbn, "authorId": r.author_id, "price": money(r.price_cents, r.currency),
    "publishedYear": r.published_year, "version": r.version, "updatedAt": r.updated_at,
}, models.Book)


def book_columns(body: models.BookPatch) -> dict[str, Any]:
    values = changes(body)
    if price := values.pop("price", None):
        values.update(price_cents=cents(price["amount"]), currency=price["currency"])
    return values


def routes(api: Api) -> None:
    # `GET /books?ids=...&include=author`: the books and their authors in one answer.
    add_reads(api, BOOK, "/books", "id", include={"author": Include(AUTHOR, "author_id")})
    add_patch(api, BOOK, "/books", "id", models.BookPatch, book_columns)
    add_reads(api, AUTHOR, "/authors", "id")


def seed(shop: Shop) -> dict:
    return {authors: shop.authors, books: shop.books}


SPEC = ServiceSpec("catalog", 8102, ("book", "author"), metadata, routes, seed)
