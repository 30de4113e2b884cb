"""The checkout saga, orchestrated by the orders service (README, "Checkout").

An order is created PENDING with its saga record in one local transaction; then each step
is one call to another service, made with an idempotency key derived from the saga's
token and the step, so a retry (or a resumption after a crash) never has a second effect:
reserve stock -> capture payment -> create shipment -> confirm the reservation -> PAID.
A step that fails for good starts compensation: the steps that may have had an effect are
undone in reverse (cancel shipment, refund, release), then the order is CANCELLED with a
reason. The saga log (`order_saga`) lives in this service's own database; unsettled sagas
are resumed at start-up and every BOOKVAULT_SAGA_RESUME_S seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from . import models
from .api import Api, path_param
from .context import Context, context
from .db import BigId, Database, Reads, now_iso
from .errors import Conflict, NotFound, Unavailable, Unprocessable
from .idempotency import fingerprint, idempotency_key
from .money import total_cents
from .params import money, parse_id, read_body
from .responses import JSONResponse
from .upstreams import Unreachable, Upstreams

__all__ = ["add_saga_table", "routes", "sagas_running", "cancel_order"]

log = logging.getLogger("bookvault.saga")

FORWARD = ("reserve", "pay", "ship", "confirm", "complete")
SETTLED = ("COMPLETED", "CANCELLED")
CHECKOUT_HEADER = {
    "name": "Idempotency-Key", "in": "header", "required": True,
    "description": "Required: the same key answers the same checkout and never starts a second one",
    "schema": {"type": "string", "pattern": r"^[!-~]{1,255}$"},
}


def add_saga_table(metadata: MetaData) -> Table:
    return Table(
        "order_saga", metadata,
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("token", String, nullable=False, unique=True),  # step keys derive from it
        Column("idempotency_key", String, nullable=False, unique=True),
        Column("fingerprint", String, nullable=False),
        Column("kind", String, nullable=False),  # checkout | cancel (an order placed without a saga)
        Column("order_id", BigId, nullable=False),
        Column("request", JSON, nullable=False),  # what the steps send: priced items, address, method
        Column("status", String, nullable=False),  # RUNNING | COMPENSATING | COMPLETED | CANCELLED
        Column("step", String, nullable=True),  # the next forward step
        Column("compensations", JSON, nullable=False),  # steps that may have had an effect, in order
        Column("reservation_id", BigId, nullable=True), Column("payment_id", BigId, nullable=True),
        Column("shipment_id", BigId, nullable=True),
        Column("reason", String, nullable=True), Column("attempts", Integer, nullable=False),
        Column("created_at", String, nullable=False), Column("updated_at", String, nullable=False),
        Index("order_saga_unsettled", "status"), Index("order_saga_by_order", "order_id"),
    )


def _saga_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "orderId": row.order_id, "status": row.status,
        "step": row.step if row.status not in SETTLED else None, "reason": row.reason,
        "compensationsOwed": list(row.compensations), "reservationId": row.reservation_id,
        "paymentId": row.payment_id, "shipmentId": row.shipment_id, "attempts": row.attempts,
        "updatedAt": row.updated_at,
    }


@dataclass
class Step:
    """What one step call came to: done (with what it learnt), failed for good, or unknown."""

    outcome: str  # "done" | "failed" | "unknown"
    values: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def _error_code(response: httpx.Response, fallback: str) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        return str(response.json()["error"]["code"])
    return fallback


class Sagas:
    """Drives sagas: at most one task per saga in this process, whoever asks for it."""

    def __init__(self, app: Starlette) -> None:
        ctx: Context = app.state.ctx
        self.app = app
        self.db: Database = ctx.db
        self.table: Table = ctx.db.metadata.tables["order_saga"]
        self.orders: Table = ctx.db.metadata.tables["orders"]
        self.upstreams = Upstreams(ctx.options)
        self.attempts = int(ctx.options.get("step_attempts", os.environ.get("BOOKVAULT_SAGA_STEP_ATTEMPTS", 3)))
        self.backoff_s = float(ctx.options.get("retry_backoff_s", os.environ.get("BOOKVAULT_SAGA_BACKOFF_S", 0.05)))
        self.tasks: dict[int, asyncio.Task[None]] = {}

    # -- driving -------------------------------------------------------------------------------

    def drive(self, saga_id: int) -> asyncio.Task[None]:
        task = self.tasks.get(saga_id)
        if task is None or task.done():
            task = asyncio.create_task(self._run(saga_id), name=f"saga-{saga_id}")
            self.tasks[saga_id] = task
            task.add_done_callback(lambda t: self.tasks.pop(saga_id, None) if self.tasks.get(saga_id) is t else None)
        return task

    async def settle(self, saga_id: int, wait_s: float) -> Any:
        """Drive the saga up to `wait_s` seconds (it goes on in the background after); its row."""
        task = self.drive(saga_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), wait_s)
        return await self.load(saga_id)

    async def resume_all(self) -> int:
        async with self.db.read() as conn:
            ids = [r.id for r in await conn.execute(
                select(self.table.c.id).where(self.table.c.status.in_(("RUNNING", "COMPENSATING"))))]
        for saga_id in ids:
            self.drive(saga_id)
        return len(ids)

    async def load(self, saga_id: int) -> Any:
        async with self.db.read() as conn:
            return (await conn.execute(select(self.table).where(self.table.c.id == saga_id))).first()

    async def _run(self, saga_id: int) -> None:
        try:
            while (saga := await self.load(saga_id)) is not None and saga.status not in SETTLED:
                if saga.status == "RUNNING":
                    await self._forward(saga)
                elif not await self._compensate(saga):
                    return  # a service is still down: the resumer tries again later
        except Exception:  # noqa: BLE001 - the saga is left as recorded, the resumer picks it up
            log.exception("saga %s stopped; it will be resumed", saga_id)

    async def _forward(self, saga: Any) -> None:
        if saga.step == "complete":
            await self._finish(saga, "COMPLETED", "PAID", None)
            self._crash_point("complete")
            return
        step, tried = await self._attempt(FORWARD_STEPS[saga.step], saga)
        owed = list(saga.compensations)
        if step.outcome == "done":
            if saga.step in UNDO and saga.step not in owed:
                owed.append(saga.step)
            nxt = FORWARD[FORWARD.index(saga.step) + 1]
            await self._save(saga, step=nxt, compensations=owed, attempts=saga.attempts + tried, **step.values)
            self._crash_point(saga.step)
        else:
            if step.outcome == "unknown" and saga.step in UNDO and saga.step not in owed:
                owed.append(saga.step)  # it may have happened: undo it to be sure
            await self._save(saga, status="COMPENSATING", reason=step.reason, compensations=owed,
                             attempts=saga.attempts + tried)

    async def _compensate(self, saga: Any) -> bool:
        """Undo what is owed, latest first; each undo stands alone, so a service that is
        down holds back only its own (the refund does not wait for shipping to return)."""
        owed, tried_total, learnt = list(saga.compensations), 0, {}
        for step_name in reversed(saga.compensations):
            step, tried = await self._attempt(UNDO[step_name], saga)
            tried_total += tried
            learnt.update(step.values)
            if step.outcome != "unknown":
                owed.remove(step_name)
        if owed != list(saga.compensations) or tried_total or learnt:
            await self._save(saga, compensations=owed, attempts=saga.attempts + tried_total, **learnt)
        if owed:
            return False  # the resumer tries again later
        await self._finish(await self.load(saga.id), "CANCELLED", "CANCELLED", saga.reason)
        return True

    async def _attempt(self, action: Callable[[Sagas, Any], Awaitable[Step]], saga: Any) -> tuple[Step, int]:
        """Up to `attempts` tries while the answer is unknown; how many were tried again."""
        for n in range(self.attempts):
            step = await action(self, saga)
            if step.outcome != "unknown" or n == self.attempts - 1:
                return step, n
            await asyncio.sleep(self.backoff_s * 2**n)
        raise AssertionError("unreachable")

    def _crash_point(self, step: str) -> None:
        admin = getattr(self.app.state, "admin", None)
        if admin is not None and admin.faults.crashAfterStep == step:
            log.warning("crashing after step %s, as /_admin/faults asked", step)
            os._exit(70)

    async def _save(self, saga: Any, **values: Any) -> None:
        async with self.db.write() as conn:
            await conn.execute(update(self.table).where(self.table.c.id == saga.id).values(
                **values, updated_at=now_iso()))

    async def _finish(self, saga: Any, status: str, order_status: str, reason: str | None) -> None:
        """The saga settles and the order takes its final status, in one transaction."""
        now = now_iso()
        async with self.db.write() as conn:
            await set_order_status(self.db, conn, self.orders, saga.order_id, order_status, now)
            await conn.execute(update(self.table).where(self.table.c.id == saga.id).values(
                status=status, step=None, reason=reason, compensations=[], updated_at=now))

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, service: str, method: str, path: str, saga: Any, step: str,
                   json: Any = None) -> httpx.Response | None:
        """One call with the step's idempotency key; None when the answer is unknown
        (unreachable, timed out, 5xx, 429)."""
        try:
            response = await self.upstreams.call(service, method, path, json=json, key=step_key(saga, step))
        except Unreachable as exc:
            log.info("saga %s step %s: %s", saga.id, step, exc)
            return None
        if response.status_code >= 500 or response.status_code == 429:
            return None
        return response


def step_key(saga: Any, step: str) -> str:
    """The Idempotency-Key of one of the saga's calls (README, "Checkout")."""
    return f"saga-{saga.token}-{step}"


def _unavailable(service: str) -> Step:
    return Step("unknown", reason=f"{service.upper()}_UNAVAILABLE")


def _create_step(service: str, path: str, column: str, body: Callable[[Any], dict[str, Any]]) -> Callable[..., Awaitable[Step]]:
    async def step(sagas: Sagas, saga: Any) -> Step:
        response = await sagas.call(service, "POST", path, saga, path.strip("/"), body(saga))
        if response is None:
            return _unavailable(service)
        if response.status_code in (200, 201):
            return Step("done", {column: response.json()["id"]})
        return Step("failed", reason=_error_code(response, f"{service.upper()}_REJECTED"))

    return step


def _undo_step(service: str, create_path: str, column: str, action: str,
               create: Callable[..., Awaitable[Step]]) -> Callable[..., Awaitable[Step]]:
    """Undo what a create step did. If its id is unknown (the answer was lost), the create
    is sent again with the same key: the service answers what it did (or does it now, to
    be undone at once), or that it refused, and then there is nothing to undo."""

    async def undo(sagas: Sagas, saga: Any) -> Step:
        entity_id = getattr(saga, column)
        learnt: dict[str, Any] = {}
        if entity_id is None:
            created = await create(sagas, saga)
            if created.outcome != "done":
                return created if created.outcome == "unknown" else Step("done")
            learnt = created.values
            entity_id = learnt[column]
        response = await sagas.call(service, "POST", f"{create_path}/{entity_id}/{action}", saga, action)
        if response is None:
            return Step("unknown", learnt)
        # 2xx: undone; 409 (already shipped, not refundable) or 404: nothing this saga can undo.
        return Step("done", learnt)

    return undo


def _items(saga: Any) -> list[dict[str, int]]:
    return [{"bookId": i["bookId"], "quantity": i["quantity"]} for i in saga.request["items"]]


_reserve = _create_step("inventory", "/reservations", "reservation_id",
                        lambda s: {"items": _items(s), "orderId": s.order_id})


def _payment(saga: Any) -> dict[str, Any]:
    return {"orderId": saga.order_id, "amount": money(saga.request["totalCents"], saga.request["currency"]),
            "method": saga.request["paymentMethod"]}


_pay = _create_step("payments", "/payments", "payment_id", _payment)
_ship = _create_step("shipping", "/shipments", "shipment_id",
                     lambda s: {"orderId": s.order_id, "address": s.request["shippingAddress"]})


async def _confirm(sagas: Sagas, saga: Any) -> Step:
    response = await sagas.call("inventory", "POST", f"/reservations/{saga.reservation_id}/confirm", saga, "confirm")
    if response is None:
        return _unavailable("inventory")
    if response.status_code == 200:
        return Step("done")
    return Step("failed", reason=_error_code(response, "INVENTORY_REJECTED"))


async def _undo_pay(sagas: Sagas, saga: Any) -> Step:
    """Undo the payment step: refund its payment, but only a capture that happened. Whose
    outcome is unknown (payments failed or was slow), it is not sent again to find out, which
    captured the payment of an order that was never paid and refunded it 15 ms later, a charge
    the customer sees (issue 24). Payments is asked what became of the key (POST
    /payment-voids), which also voids it: a create still on its way with that key is refused
    and never captures. Only a payment it says was CAPTURED is refunded."""
    payment_id, learnt = saga.payment_id, {}
    if payment_id is None:
        response = await sagas.call("payments", "POST", "/payment-voids", saga, "void-payment",
                                    {"key": step_key(saga, "payments"), "payment": _payment(saga)})
        if response is None:
            return _unavailable("payments")
        if response.status_code != 200:  # not an answer to act on: keep it owed, and say so
            log.error("saga %s: payments answered %s to the void of its payment", saga.id, response.status_code)
            return _unavailable("payments")
        found = response.json()["payment"]
        if found is None:
            return Step("done")  # voided: nothing was charged, nothing ever will be under that key
        learnt = {"payment_id": found["id"]}
        if found["status"] != "CAPTURED":
            return Step("done", learnt)  # declined, or refunded already
        payment_id = found["id"]
    response = await sagas.call("payments", "POST", f"/payments/{payment_id}/refund", saga, "refund")
    if response is None:
        return Step("unknown", learnt)
    # 2xx: refunded; 409 (not refundable: it failed) or 404: nothing to undo.
    return Step("done", learnt)


FORWARD_STEPS: dict[str, Callable[[Sagas, Any], Awaitable[Step]]] = {
    "reserve": _reserve, "pay": _pay, "ship": _ship, "confirm": _confirm,
}
UNDO: dict[str, Callable[[Sagas, Any], Awaitable[Step]]] = {
    "reserve": _undo_step("inventory", "/reservations", "reservation_id", "release", _reserve),
    "pay": _undo_pay,
    "ship": _undo_step("shipping", "/shipments", "shipment_id", "cancel", _ship),
}


async def set_order_status(db: Database, conn: AsyncConnection, orders: Table, order_id: int, status: str, now: str) -> None:
    row = (await conn.execute(update(orders).where(orders.c.id == order_id, orders.c.status != status).values(
        status=status, version=orders.c.version + 1, updated_at=now).returning(orders.c.version))).first()
    if row is not None:
        await db.emit(conn, "order", "updated", order_id, row.version, now)


# -- HTTP ------------------------------------------------------------------------------------------


def sagas_running(request: Request) -> Sagas:
    sagas: Sagas = request.app.state.sagas
    return sagas


def _wait_s(request: Request) -> float:
    """How long to wait for the saga before answering 202. A caller that says how long it
    waits (`X-Request-Deadline-Ms`, as the gateway sends: README, "Degradation and
    resilience") gets its answer within three quarters of that, not a timeout with the
    checkout's id lost."""
    wait = float(context(request).options.get("checkout_wait_s", os.environ.get("BOOKVAULT_CHECKOUT_WAIT_S", 10.0)))
    asked = request.headers.get("x-request-deadline-ms", "")
    if asked.isdigit():
        wait = min(wait, int(asked) * 0.75 / 1000)
    return wait


def _answer(saga: Any, replayed: bool = False) -> JSONResponse:
    # Settled: 201, the same status and body for every repeat of the key; still running: 202.
    headers = {"Location": f"/checkouts/{saga.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(_saga_json(saga), status_code=201 if saga.status in SETTLED else 202, headers=headers)


async def _priced(sagas: Sagas, body: models.CheckoutCreate) -> tuple[list[dict[str, Any]], int, str]:
    """The items with each book's title and price as the catalog has them now."""
    quantities: dict[int, int] = {}
    for item in body.items:
        quantities[item.bookId] = quantities.get(item.bookId, 0) + item.quantity
    try:
        response = await sagas.upstreams.call("catalog", "GET", "/books",
                                              params={"ids": ",".join(map(str, quantities))})
    except Unreachable as exc:
        raise Unavailable("the catalog cannot be reached; nothing was ordered", code="CATALOG_UNAVAILABLE") from exc
    if response.status_code != 200:
        raise Unavailable("the catalog did not answer; nothing was ordered", code="CATALOG_UNAVAILABLE")
    page = response.json()
    if page["missing"]:
        raise Unprocessable(f"no such book: {', '.join(map(str, page['missing']))}", code="UNKNOWN_BOOK")
    books = {b["id"]: b for b in page["data"]}
    currencies = {b["price"]["currency"] for b in books.values()}
    if len(currencies) > 1:
        raise Unprocessable("the books are priced in different currencies", code="MIXED_CURRENCY")
    items = [{"bookId": book, "quantity": qty, "unitPrice": books[book]["price"], "titleAtPurchase": books[book]["title"]}
             for book, qty in quantities.items()]
    # 400 AMOUNT_OUT_OF_RANGE past what a Money can say, before the order is written (mock_services/money.py).
    return items, total_cents(items, "the checkout's total"), currencies.pop()


async def _existing(sagas: Sagas, conn: Reads, key: str, stamp: str) -> Any:
    t = sagas.table
    row = (await conn.execute(select(t).where(t.c.idempotency_key == key))).first()
    if row is not None and row.fingerprint != stamp:
        raise Unprocessable("this Idempotency-Key was used with another request", code="IDEMPOTENCY_KEY_REUSED")
    return row


async def start_checkout(request: Request) -> Response:
    key = idempotency_key(request, required=True)
    assert key is not None
    body = await read_body(request, models.CheckoutCreate)
    sagas = sagas_running(request)
    stamp = fingerprint("POST", "/checkouts", body.model_dump())
    async with sagas.db.read() as conn:
        prior = await _existing(sagas, conn, key, stamp)
    if prior is None:
        items, total, currency = await _priced(sagas, body)
        now = now_iso()
        try:
            async with sagas.db.write() as conn:
                prior = await _existing(sagas, conn, key, stamp)  # a parallel twin may have won
                if prior is None:
                    order = (await conn.execute(insert(sagas.orders).values(
                        customer_id=body.customerId, status="PENDING", placed_at=now, total_cents=total,
                        currency=currency, items=items, version=1, updated_at=now,
                    ).returning(sagas.orders.c.id))).one()
                    await sagas.db.emit(conn, "order", "created", order.id, 1, now)
                    saga_id = (await conn.execute(insert(sagas.table).values(
                        token=uuid.uuid4().hex, idempotency_key=key, fingerprint=stamp, kind="checkout",
                        order_id=order.id, status="RUNNING", step=FORWARD[0], compensations=[], attempts=0,
                        request={"items": items, "totalCents": total, "currency": currency,
                                 "shippingAddress": body.shippingAddress.model_dump(),
                                 "paymentMethod": body.paymentMethod, "customerId": body.customerId},
                        created_at=now, updated_at=now,
                    ).returning(sagas.table.c.id))).scalar_one()
        except IntegrityError:  # another process committed the same key first
            async with sagas.db.read() as conn:
                prior = await _existing(sagas, conn, key, stamp)
        if prior is None:
            sagas._crash_point("order")
            return _answer(await sagas.settle(saga_id, _wait_s(request)))
    return _answer(await sagas.settle(prior.id, _wait_s(request)), replayed=True)


async def get_checkout(request: Request) -> Response:
    saga_id = parse_id(request.path_params["id"], "id")
    saga = await sagas_running(request).load(saga_id)
    if saga is None or saga.kind != "checkout":
        raise NotFound(f"checkout {saga_id} not found")
    return JSONResponse(_saga_json(saga))


async def cancel_order(request: Request) -> Response:
    """Cancel a placed or paid order: refund, cancel the shipment, give the stock back. On an
    order already CANCELLED whose payment, shipment or stock says otherwise (a cancellation
    that skipped the saga, issue 24), the same undoes what is left."""
    order_id = parse_id(request.path_params["id"], "id")
    sagas = sagas_running(request)
    t, orders = sagas.table, sagas.orders
    async with sagas.db.read() as conn:
        order = (await conn.execute(select(orders).where(orders.c.id == order_id))).first()
        logged = (await conn.execute(select(t).where(t.c.order_id == order_id).order_by(t.c.id.desc()))).all()
    if order is None:
        raise NotFound(f"order {order_id} not found")
    if order.status == "PENDING":
        raise Conflict(f"order {order_id} is still under checkout", code="CHECKOUT_IN_PROGRESS")
    if order.status not in ("PLACED", "PAID", "CANCELLED"):
        raise Conflict(f"an order that is {order.status} cannot be cancelled", code="NOT_CANCELLABLE")
    latest = logged[0] if logged else None
    if latest is not None and latest.status not in SETTLED:
        saga_id: int | None = int(latest.id)  # at work on the order already: drive it on
    elif order.status == "PAID" and latest is not None and latest.kind == "checkout" and latest.status == "COMPLETED":
        saga_id = await _reopen(sagas, latest)
    else:
        saga_id = await _start_cancel(sagas, order, latest, [s.reservation_id for s in logged if s.reservation_id])
    if saga_id is not None:
        await sagas.settle(saga_id, _wait_s(request))
    async with sagas.db.read() as conn:
        order = (await conn.execute(select(orders).where(orders.c.id == order_id))).one()
    from .orders import ORDER  # the orders module builds on this one for its routes

    return JSONResponse(ORDER.to_json(order), status_code=200 if order.status == "CANCELLED" else 202)


async def _reopen(sagas: Sagas, checkout: Any) -> int:
    """A paid checkout is cancelled by compensating it: everything it did is undone."""
    t = sagas.table
    async with sagas.db.write() as conn:
        await conn.execute(update(t).where(t.c.id == checkout.id, t.c.status == "COMPLETED").values(
            status="COMPENSATING", reason="CANCELLED_BY_CUSTOMER", compensations=["reserve", "pay", "ship"],
            updated_at=now_iso()))
    return int(checkout.id)


async def _lookup(sagas: Sagas, service: str, path: str, params: dict[str, str] | None = None) -> httpx.Response:
    try:
        response = await sagas.upstreams.call(service, "GET", path, params=params)
    except Unreachable as exc:
        raise Unavailable(f"{service} cannot be reached; the order is unchanged", code=f"{service.upper()}_UNAVAILABLE") from exc
    if response.status_code not in (200, 404):
        raise Unavailable(f"{service} did not answer; the order is unchanged", code=f"{service.upper()}_UNAVAILABLE")
    return response


async def _start_cancel(sagas: Sagas, order: Any, latest: Any, reservations: list[int]) -> int | None:
    """A cancel saga owing what the other services still hold for the order: a CAPTURED payment,
    a PENDING shipment, a HELD or CONFIRMED reservation of one of its checkouts. Placed without
    a checkout (the demo data), or cancelled past its saga, the order's own record does not say
    what they are: they are asked. None: a CANCELLED order with nothing left to undo."""
    owed: dict[str, Any] = {}
    for service, path, column, step, live in (("payments", "/payments", "payment_id", "pay", "CAPTURED"),
                                              ("shipping", "/shipments", "shipment_id", "ship", "PENDING")):
        for entity in (await _lookup(sagas, service, path, {"orderIds": str(order.id)})).json()["data"]:
            if entity["status"] == live:
                owed[step], owed[column] = True, entity["id"]
    for reservation in reservations:
        found = await _lookup(sagas, "inventory", f"/reservations/{reservation}")
        if found.status_code == 200 and found.json()["status"] in ("HELD", "CONFIRMED"):
            owed["reserve"], owed["reservation_id"] = True, reservation
    if not owed and order.status == "CANCELLED":
        return None
    # One key per state of the log: a parallel cancel of the same order shares this saga.
    t, key = sagas.table, f"cancel-order-{order.id}" + (f"-after-{latest.id}" if latest is not None else "")
    now = now_iso()
    try:
        async with sagas.db.write() as conn:
            return int((await conn.execute(insert(t).values(
                token=uuid.uuid4().hex, idempotency_key=key, fingerprint="", kind="cancel",
                order_id=order.id, request={}, status="COMPENSATING", step=None, reason="CANCELLED_BY_CUSTOMER",
                compensations=[s for s in ("reserve", "pay", "ship") if s in owed], attempts=0,
                reservation_id=owed.get("reservation_id"), payment_id=owed.get("payment_id"),
                shipment_id=owed.get("shipment_id"), created_at=now, updated_at=now,
            ).returning(t.c.id))).scalar_one())
    except IntegrityError:  # a parallel cancel started it
        async with sagas.db.read() as conn:
            return int((await conn.execute(select(t.c.id).where(t.c.idempotency_key == key))).scalar_one())


@contextlib.asynccontextmanager
async def resumer(app: Starlette) -> AsyncIterator[None]:
    """Resume unsettled sagas at start-up, then every BOOKVAULT_SAGA_RESUME_S seconds."""
    ctx: Context = app.state.ctx
    sagas = Sagas(app)
    app.state.sagas = sagas
    every = float(ctx.options.get("saga_resume_s", os.environ.get("BOOKVAULT_SAGA_RESUME_S", 5.0)))

    async def loop() -> None:
        while True:
            with contextlib.suppress(Exception):  # the next tick tries again
                await sagas.resume_all()
            await asyncio.sleep(every)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        running = [task, *sagas.tasks.values()]
        for t in running[1:]:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await sagas.upstreams.aclose()


def routes(api: Api) -> None:
    api.add("POST", "/checkouts", start_checkout, summary="Check out: order, reserve, pay, ship (a saga)",
            params=[CHECKOUT_HEADER], body=models.CheckoutCreate, ok=(201, models.Checkout), errors=(400, 422, 503))
    api.add("GET", "/checkouts/{id}", get_checkout, summary="A checkout's state", params=[path_param("id")],
            ok=(200, models.Checkout), errors=(400, 404))
    api.add("POST", "/orders/{id}/cancel", cancel_order, summary="Cancel an order, with refund, release and cancelled shipment",
            params=[path_param("id")], ok=(200, models.Order), errors=(400, 404, 409, 503))
