"""orders: what was bought. An order keeps each item's title and unit price at purchase
time (denormalised on write), because the catalog's current price is not what was paid."""

import base64
from typing import Any

from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, func, insert, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import models
from .api import Api, batch_of, ref
from .app import ServiceSpec
from .context import context
from .db import add_outbox, now_iso
from .demo_data import Shop
from .errors import BadRequest, Conflict
from .params import cents, money, parse_id, parse_ids, parse_int, read_body
from .resource import Entity, add_one, add_patch, batch_query, batch_response, changes, etag_of, versioned_table

metadata = MetaData()
add_outbox(metadata)
orders = versioned_table(
    "orders", metadata,
    Column("id", Integer, primary_key=True), Column("customer_id", Integer, nullable=False),
    Column("status", String, nullable=False), Column("placed_at", String, nullable=False),
    Column("total_cents", Integer, nullable=False), Column("currency", String, nullable=False),
    Column("items", JSON, nullable=False),
    Index("orders_by_customer", "customer_id", "id"),
)
ORDER = Entity("order", orders, lambda r: {
    "id": r.id, "customerId": r.customer_id, "status": r.status, "placedAt": r.placed_at,
    "total": money(r.total_cents, r.currency), "items": r.items, "version": r.version, "updatedAt": r.updated_at,
}, models.Order)

# Status moves forward only; anything else is a conflict with the order's current state.
TRANSITIONS = {"PLACED": {"PAID", "CANCELLED"}, "PAID": {"SHIPPED", "CANCELLED"}, "SHIPPED": {"DELIVERED"}}
PAGE = {
    "type": "object", "additionalProperties": False, "required": ["data", "nextCursor", "totalCount"],
    "properties": {
        "data": {"type": "array", "items": ref(models.Order)},
        "nextCursor": {"type": ["string", "null"], "description": "Pass as `after` for the next page"},
        "totalCount": {"type": "integer"},
    },
}


def _cursor(order_id: int) -> str:
    return base64.urlsafe_b64encode(f"order:{order_id}".encode()).decode().rstrip("=")


def _after(raw: str) -> int:
    try:
        kind, _, value = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode().partition(":")
        if kind == "order":
            return parse_id(value)
    except (ValueError, BadRequest):
        pass
    raise BadRequest("after is not a cursor this service issued")


async def collection(request: Request) -> Response:
    q = request.query_params
    if "customerId" in q and "ids" in q:
        raise BadRequest("give either ids or customerId, not both")
    if "customerId" not in q:
        ids = parse_ids(q.get("ids"), "ids", context(request).max_batch)
        return await batch_response(request, ORDER, "id", ids)
    customer = parse_id(q["customerId"], "customerId")
    limit = parse_int(q.get("limit"), "limit", 20, 1, context(request).max_batch)
    mine = orders.c.customer_id == customer
    page = select(orders).where(mine)
    if "after" in q:
        page = page.where(orders.c.id < _after(q["after"]))
    async with context(request).db.read() as conn:
        rows = (await conn.execute(page.order_by(orders.c.id.desc()).limit(limit + 1))).all()
        total = (await conn.execute(select(func.count()).where(mine))).scalar_one()
    more = len(rows) > limit
    rows = rows[:limit]
    return JSONResponse({
        "data": [ORDER.to_json(r) for r in rows],
        "nextCursor": _cursor(rows[-1].id) if more else None,
        "totalCount": total,
    })


async def create(request: Request) -> Response:
    body = await read_body(request, models.OrderCreate)
    currencies = {item.unitPrice.currency for item in body.items}
    if len(currencies) > 1:
        raise BadRequest("all items of an order must share one currency")
    items = [item.model_dump() for item in body.items]
    total = sum(cents(item.unitPrice.amount) * item.quantity for item in body.items)
    db = context(request).db
    now = now_iso()
    async with db.write() as conn:
        row = (await conn.execute(insert(orders).values(
            customer_id=body.customerId, status="PLACED", placed_at=now, total_cents=total,
            currency=currencies.pop(), items=items, version=1, updated_at=now,
        ).returning(*orders.c))).one()
        await db.emit(conn, "order", "created", row.id, row.version, now)
    return JSONResponse(ORDER.to_json(row), status_code=201,
                        headers={"Location": f"/orders/{row.id}", "ETag": etag_of(row.version)})


def _guard(current: Any, body: models.OrderPatch) -> None:
    if body.status not in TRANSITIONS.get(current.status, set()):
        raise Conflict(f"an order that is {current.status} cannot become {body.status}")


def routes(api: Api) -> None:
    add_one(api, ORDER, "/orders", "id")
    api.add("GET", "/orders", collection, summary="Orders by ids, or one customer's orders newest first", params=[
        batch_query("ids"),
        {"name": "customerId", "in": "query", "required": False, "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"}},
        {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
    ], ok=(200, {"oneOf": [PAGE, batch_of(models.Order)]}))
    api.add("POST", "/orders", create, summary="Place an order", body=models.OrderCreate,
            ok=(201, models.Order))
    add_patch(api, ORDER, "/orders", "id", models.OrderPatch, changes, guard=_guard)


def seed(shop: Shop) -> dict:
    return {orders: [{
        **{k: v for k, v in o.items() if k != "items"},
        "items": [{"bookId": it["bookId"], "quantity": it["quantity"], "unitPrice": money(it["unit_cents"], o["currency"]),
                   "titleAtPurchase": it["title"]} for it in o["items"]],
    } for o in shop.orders]}


SPEC = ServiceSpec("orders", 8104, ("order",), metadata, routes, seed)
