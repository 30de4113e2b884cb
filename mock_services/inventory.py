"""inventory: stock per book, keyed by the catalog's book id (an id, never a join), and
reservations: stock held for an order, all of its books or none, until it is confirmed,
released, or it expires."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from . import models
from .api import Api, path_param
from .app import ServiceSpec
from .context import Context, context
from .db import BigId, Database, add_outbox, now_iso
from .demo_data import Shop
from .errors import NotFound
from .idempotency import IDEMPOTENCY_HEADER, Outcome, add_idempotency_keys, idempotent
from .params import parse_id, read_body
from .resource import Entity, add_one, add_patch, add_reads, changes, etag_of, versioned_table

__all__ = ["SPEC", "expire_due"]

metadata = MetaData()
add_outbox(metadata)
add_idempotency_keys(metadata)
stock = versioned_table(
    "stock", metadata,
    Column("book_id", BigId, primary_key=True), Column("available", Integer, nullable=False),
    Column("warehouse", String, nullable=False),
)
reservations = versioned_table(
    "reservations", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True), Column("order_id", BigId, nullable=True),
    Column("status", String, nullable=False), Column("items", JSON, nullable=False),
    Column("expires_at", String, nullable=False),
    Index("reservations_due", "status", "expires_at"),
)
STOCK = Entity("stock", stock, lambda r: {
    "bookId": r.book_id, "available": r.available, "warehouse": r.warehouse, "version": r.version, "updatedAt": r.updated_at,
}, models.Stock, key="book_id")
RESERVATION = Entity("reservation", reservations, lambda r: {
    "id": r.id, "orderId": r.order_id, "status": r.status, "items": r.items, "expiresAt": r.expires_at,
    "version": r.version, "updatedAt": r.updated_at,
}, models.Reservation)

DEFAULT_TTL_S = 900.0
DEFAULT_SWEEP_S = 5.0


def _setting(ctx: Context, option: str, env: str, default: float) -> float:
    return float(ctx.options.get(option, os.environ.get(env, default)))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _restock(db: Database, conn: AsyncConnection, items: list[dict[str, int]], now: str, delta_sign: int) -> None:
    """Give back (`+1`) or take (`-1`, only where enough is left) each item's quantity, with its event."""
    for item in items:
        query = update(stock).where(stock.c.book_id == item["bookId"])
        if delta_sign < 0:  # never below zero, even if the lock below were ever bypassed
            query = query.where(stock.c.available >= item["quantity"])
        row = (await conn.execute(query.values(
            available=stock.c.available + delta_sign * item["quantity"], version=stock.c.version + 1, updated_at=now,
        ).returning(stock.c.version))).first()
        if row is None:
            raise _Short()
        await db.emit(conn, "stock", "updated", item["bookId"], row.version, now)


class _Short(Exception):
    """A conditional decrement found less stock than its check did: roll back everything."""


async def _set_status(db: Database, conn: AsyncConnection, row: Any, status: str, now: str) -> Any:
    t = reservations
    updated = (await conn.execute(update(t).where(t.c.id == row.id).values(
        status=status, version=t.c.version + 1, updated_at=now).returning(*t.c))).one()
    await db.emit(conn, "reservation", status.lower(), row.id, updated.version, now)
    return updated


async def expire_due(db: Database, now: str | None = None) -> int:
    """Release every HELD reservation past its expiry, with its events; how many expired."""
    now = now or now_iso()
    async with db.write() as conn:
        due = (await conn.execute(select(reservations).where(
            reservations.c.status == "HELD", reservations.c.expires_at <= now))).all()
        for row in due:
            await _restock(db, conn, row.items, now, +1)
            await _set_status(db, conn, row, "EXPIRED", now)
    return len(due)


def _merged(items: list[models.LineItem]) -> list[dict[str, int]]:
    totals: dict[int, int] = {}
    for item in items:
        totals[item.bookId] = totals.get(item.bookId, 0) + item.quantity
    return [{"bookId": book, "quantity": qty} for book, qty in sorted(totals.items())]


def _reservation(row: Any, status: int = 200) -> Outcome:
    return Outcome(status, RESERVATION.to_json(row), {"ETag": etag_of(row.version)})


async def reserve(request: Request) -> Response:
    body = await read_body(request, models.ReservationCreate)
    ctx = context(request)
    items = _merged(body.items)
    ttl = _setting(ctx, "reservation_ttl_s", "BOOKVAULT_RESERVATION_TTL_S", DEFAULT_TTL_S)

    async def effect(conn: AsyncConnection) -> Outcome:
        now = datetime.now(UTC)
        stamp = _iso(now)
        have = {r.book_id: r.available for r in await conn.execute(
            select(stock.c.book_id, stock.c.available).where(stock.c.book_id.in_([i["bookId"] for i in items])))}
        short = [i for i in items if have.get(i["bookId"], 0) < i["quantity"]]
        if short:  # all or none: nothing is held
            return Outcome.error(409, "OUT_OF_STOCK", "not enough stock for book(s) " + ", ".join(
                str(i["bookId"]) for i in short), [
                {"bookId": str(i["bookId"]), "requested": str(i["quantity"]), "available": str(have.get(i["bookId"], 0))}
                for i in short])
        await _restock(ctx.db, conn, items, stamp, -1)
        row = (await conn.execute(insert(reservations).values(
            order_id=body.orderId, status="HELD", items=items, expires_at=_iso(now + timedelta(seconds=ttl)),
            version=1, updated_at=stamp).returning(*reservations.c))).one()
        await ctx.db.emit(conn, "reservation", "created", row.id, 1, stamp)
        outcome = _reservation(row, 201)
        outcome.headers["Location"] = f"/reservations/{row.id}"
        return outcome

    try:
        return await idempotent(request, body.model_dump(), effect)
    except _Short:  # only if another writer slipped past the check: answer as the check would
        return await reserve(request)


def _transition(target: str) -> Any:
    """confirm: HELD -> CONFIRMED; release: HELD or CONFIRMED -> RELEASED, the stock given back.
    Asking again for the state a reservation is already in answers it as it is."""

    async def endpoint(request: Request) -> Response:
        key = parse_id(request.path_params["id"], "id")
        db = context(request).db

        async def effect(conn: AsyncConnection) -> Outcome:
            row = (await conn.execute(select(reservations).where(reservations.c.id == key))).first()
            if row is None:
                raise NotFound(f"reservation {key} not found")
            now = now_iso()
            if row.status == "HELD" and row.expires_at <= now:  # lazily, before the sweep gets to it
                await _restock(db, conn, row.items, now, +1)
                row = await _set_status(db, conn, row, "EXPIRED", now)
            if target == "CONFIRMED":
                if row.status == "HELD":
                    row = await _set_status(db, conn, row, "CONFIRMED", now)
                elif row.status != "CONFIRMED":
                    return Outcome.error(409, f"RESERVATION_{row.status}", f"reservation {key} is {row.status}")
            elif row.status in ("HELD", "CONFIRMED"):
                await _restock(db, conn, row.items, now, +1)
                row = await _set_status(db, conn, row, "RELEASED", now)
            return _reservation(row)

        return await idempotent(request, None, effect)

    return endpoint


@contextlib.asynccontextmanager
async def sweeper(app: Starlette) -> AsyncIterator[None]:
    """Expire overdue reservations every BOOKVAULT_RESERVATION_SWEEP_S seconds."""
    ctx: Context = app.state.ctx
    every = _setting(ctx, "reservation_sweep_s", "BOOKVAULT_RESERVATION_SWEEP_S", DEFAULT_SWEEP_S)

    async def loop() -> None:
        while True:
            with contextlib.suppress(Exception):  # a failed sweep is retried at the next tick
                await expire_due(ctx.db)
            await asyncio.sleep(every)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def routes(api: Api) -> None:
    add_reads(api, STOCK, "/stock", "bookId", batch_param="bookIds")
    add_patch(api, STOCK, "/stock", "bookId", models.StockPatch, changes)
    api.add("POST", "/reservations", reserve, summary="Hold stock for several books: all of them or none",
            params=[IDEMPOTENCY_HEADER], body=models.ReservationCreate, ok=(201, models.Reservation),
            errors=(400, 409, 422))
    add_one(api, RESERVATION, "/reservations", "id")
    for action, target in (("confirm", "CONFIRMED"), ("release", "RELEASED")):
        api.add("POST", f"/reservations/{{id}}/{action}", _transition(target),
                summary=f"{action.capitalize()} a reservation", params=[path_param("id"), IDEMPOTENCY_HEADER],
                ok=(200, models.Reservation), errors=(400, 404, 409, 422))


def seed(shop: Shop) -> dict:
    return {stock: shop.stock}


SPEC = ServiceSpec("inventory", 8103, ("stock", "reservation"), metadata, routes, seed, background=sweeper)
