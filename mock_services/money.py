"""Money as the services store it: integer cents in 64-bit columns, never past the Money
pattern's maximum (issue 24).

The documented Money amount (models.AMOUNT) goes up to 999999999.99, 10**11 - 1 cents: past a
32-bit INTEGER (PostgreSQL refused a price of 999999999.99 with a 500), within a BIGINT. A
total (quantity x unit price, summed) can go further than any one amount: it is checked
before it is written, so no answer ever carries an amount its own document refuses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger

from .errors import BadRequest
from .models import MAX_CENTS
from .params import cents

__all__ = ["CENTS", "MAX_CENTS", "OUT_OF_RANGE", "checked", "total_cents"]

# BIGINT on PostgreSQL; on SQLite, INTEGER affinity, already 64-bit.
CENTS = BigInteger
OUT_OF_RANGE = "AMOUNT_OUT_OF_RANGE"


def checked(amount_cents: int, what: str) -> int:
    """`amount_cents`, or a 400 AMOUNT_OUT_OF_RANGE when a Money cannot say it."""
    if not 0 <= amount_cents <= MAX_CENTS:
        raise BadRequest(f"{what} of {amount_cents // 100}.{amount_cents % 100:02d} is more than an amount may be "
                         f"(999999999.99)", code=OUT_OF_RANGE)
    return amount_cents


def total_cents(items: Iterable[dict[str, Any]], what: str = "the order's total") -> int:
    """The sum of quantity x unitPrice over order items (`{"quantity", "unitPrice": Money}`), checked."""
    return checked(sum(cents(item["unitPrice"]["amount"]) * item["quantity"] for item in items), what)
