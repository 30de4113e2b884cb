"""Deterministic demo data. The same scale gives the same shop every time, so tests and
benchmarks can name ids. Each service seeds only its own slice; an order copies the
title and price its book had at purchase time from this generator, not from the
catalog's database (database-per-service: nobody reads another service's tables)."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["Shop", "shop"]

FIRST = "Ada Alan Barbara Chidi Dana Elif Farid Grace Hana Ivan Jun Kofi Lena Mateo Nadia Omar Priya Quinn Rosa Sven Tariq Uma Vera Wen Xavi Yara Zane".split()
LAST = "Okafor Lindqvist Moreau Tanaka Novak Haddad Rossi Kowalski Silva Nguyen Fischer Costa Ibrahim Murphy Petrov Sato Mendes Ahmed Berg Dubois".split()
ADJ = "Silent Crimson Hidden Last Broken Golden Distant Quiet Burning Frozen Lost Secret Wandering Hollow Bright".split()
NOUN = "River Garden Empire Harbour Clockmaker Orchard Lighthouse Archive Cartographer Winter Signal Bridge Kingdom Tide Atlas".split()
FORM = ("The {a} {n}", "{n} of the {a} {m}", "A {a} {n}", "The {n}'s {m}", "After the {n}")
CARRIERS = ("DHL", "UPS", "PostNL", "La Poste", "DPD")
METHODS = ("card", "paypal", "sepa", "giftcard")
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _isbn13(rng: random.Random) -> str:
    digits = [9, 7, 8] + [rng.randrange(10) for _ in range(9)]
    check = (10 - sum(d * (1 if i % 2 == 0 else 3) for i, d in enumerate(digits)) % 10) % 10
    return "".join(map(str, digits + [check]))


@dataclass(frozen=True)
class Shop:
    customers: list[dict[str, Any]]
    authors: list[dict[str, Any]]
    books: list[dict[str, Any]]
    stock: list[dict[str, Any]]
    orders: list[dict[str, Any]]
    payments: list[dict[str, Any]]
    shipments: list[dict[str, Any]]


@functools.cache
def shop(scale: int = 1) -> Shop:
    rng = random.Random(f"bookvault-{scale}")
    n_customers, n_authors, n_books, n_orders = 200 * scale, 300 * scale, 2000 * scale, 5000 * scale
    customers = []
    for i in range(1, n_customers + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        customers.append({
            "id": i, "name": f"{first} {last}", "email": f"{first}.{last}.{i}@example.com".lower(),
            "tier": rng.choices(("standard", "silver", "gold"), (70, 20, 10))[0],
        })
    authors = [
        {"id": i, "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "bio": f"Author of {rng.randint(1, 30)} books."}
        for i in range(1, n_authors + 1)
    ]
    books, stock = [], []
    for i in range(1, n_books + 1):
        title = rng.choice(FORM).format(a=rng.choice(ADJ), n=rng.choice(NOUN), m=rng.choice(NOUN))
        books.append({
            "id": i, "title": title, "isbn": _isbn13(rng), "author_id": rng.randint(1, n_authors),
            "price_cents": rng.randrange(499, 5999, 100) + 0, "currency": "EUR", "published_year": rng.randint(1950, 2025),
        })
        stock.append({"book_id": i, "available": rng.choice((0, 0, 3, 12, 40, 150)), "warehouse": rng.choice(("AMS", "BER", "LYS"))})
    orders, payments, shipments = [], [], []
    span = (datetime(2026, 10, 31, tzinfo=UTC) - EPOCH) / n_orders
    for i in range(1, n_orders + 1):
        placed = EPOCH + span * i
        age = n_orders - i  # newest orders are still moving through the pipeline
        status = "DELIVERED" if age > 150 else rng.choice(("PLACED", "PAID", "SHIPPED", "DELIVERED"))
        if rng.random() < 0.03:
            status = "CANCELLED"
        items = []
        for book in rng.sample(books, rng.randint(1, 5)):
            # Some orders were placed before a price change: the order keeps what was paid.
            unit = book["price_cents"] - (100 if rng.random() < 0.2 and book["price_cents"] > 999 else 0)
            items.append({"bookId": book["id"], "quantity": rng.randint(1, 3), "unit_cents": unit, "title": book["title"]})
        total = sum(it["unit_cents"] * it["quantity"] for it in items)
        orders.append({"id": i, "customer_id": rng.randint(1, n_customers), "status": status, "placed_at": _iso(placed),
                       "currency": "EUR", "total_cents": total, "items": items})
        if status != "PLACED":
            payments.append({"id": len(payments) + 1, "order_id": i, "amount_cents": total, "currency": "EUR",
                             "method": rng.choice(METHODS), "status": "REFUNDED" if status == "CANCELLED" else "CAPTURED"})
        if status in ("SHIPPED", "DELIVERED"):
            shipments.append({"id": len(shipments) + 1, "order_id": i, "carrier": rng.choice(CARRIERS),
                              "tracking_number": f"BV{rng.randrange(10**9, 10**10)}",
                              "status": "IN_TRANSIT" if status == "SHIPPED" else "DELIVERED",
                              "estimated_delivery": _iso(placed + timedelta(days=rng.randint(2, 6)))})
    return Shop(customers, authors, books, stock, orders, payments, shipments)
