"""orders: what was bought. An order keeps each item's title and unit price at purchase
time (denormalised on write), because the catalog's current price is not what was paid.

`GET /orders` answers three ways: orders by `ids`, one customer's page by cursor
(`customerId`), or the first page of many customers at once (`customerIds`)."""

import base64
from typing import Any

from sqlalchemy import JSON, Column, Index, MetaData, Select, String, bindparam, func, insert, select
from starlette.requests import Request
from starlette.responses import Response

from . import checkout, models
from .api import IDS_PATTERN, Api, batch_of, query_param, ref
from .app import ServiceSpec
from .context import context
from .db import BigId, EventKey, add_outbox, now_iso
from .demo_data import Shop
from .errors import BadRequest, Conflict
from .money import CENTS, total_cents
from .params import money, parse_id, parse_ids, parse_int, read_body
from .patterns import ID
from .resource import Entity, add_one, add_patch, batch_query, batch_response, changes, etag_of, versioned_table
from .responses import JSONResponse

metadata = MetaData()
add_outbox(metadata)
checkout.add_saga_table(metadata)
orders = versioned_table(
    "orders", metadata,
    Column("id", BigId, primary_key=True), Column("customer_id", BigId, nullable=False),
    Column("status", String, nullable=False), Column("placed_at", String, nullable=False),
    Column("total_cents", CENTS, nullable=False), Column("currency", String, nullable=False),
    Column("items", JSON, nullable=False),
    Index("orders_by_customer", "customer_id", "id"),
)
ORDER = Entity("order", orders, lambda r: {
    "id": r.id, "customerId": r.customer_id, "status": r.status, "placedAt": r.placed_at,
    "total": money(r.total_cents, r.currency), "items": r.items, "version": r.version, "updatedAt": r.updated_at,
}, models.Order)

# Status moves forward only; anything else is a conflict with the order's current state.
# PENDING (under checkout) is left only by its saga: PAID, or CANCELLED after compensation.
TRANSITIONS = {"PENDING": {"PAID", "CANCELLED"}, "PLACED": {"PAID", "CANCELLED"}, "PAID": {"SHIPPED", "CANCELLED"}, "SHIPPED": {"DELIVERED"}}
# Statuses a PATCH never sets (409 COMPENSATION_REQUIRED): a cancellation must undo what the order
# holds elsewhere, which only the cancel saga does (POST /orders/{id}/cancel). A PATCH to
# CANCELLED had left a PAID order's payment CAPTURED, its shipment PENDING and its stock held (issue 24).
THROUGH_SAGA = {"CANCELLED"}
PAGE = {
    "type": "object", "additionalProperties": False, "required": ["data", "nextCursor", "totalCount"],
    "properties": {
        "data": {"type": "array", "items": ref(models.Order)},
        "nextCursor": {"type": ["string", "null"], "description": "Pass as `after` for the next page"},
        "totalCount": {"type": "integer"},
    },
}
# One customer's first page inside a `customerIds` answer: exactly the `customerId` page, named.
CUSTOMER_PAGE = {
    **PAGE, "required": ["customerId", *PAGE["required"]],
    "properties": {"customerId": {"type": "integer"}, **PAGE["properties"]},
}
# The orders service cannot tell an unknown customer from one without orders, so nothing is
# ever missing; `missing` stays for the batch shape (README) and `data` is never empty, which
# keeps this shape apart from the `ids` batch in the `oneOf` below.
PAGES = {
    "type": "object", "additionalProperties": False, "required": ["data", "missing"],
    "properties": {
        "data": {"type": "array", "minItems": 1, "items": CUSTOMER_PAGE},
        "missing": {"type": "array", "maxItems": 0, "items": {"type": "integer"}},
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
    given = [name for name in ("ids", "customerId", "customerIds") if name in q]
    if len(given) > 1:
        raise BadRequest(f"give one of ids, customerId or customerIds, not {' and '.join(given)}")
    max_batch = context(request).max_batch
    if "customerId" in q:
        return await _page(request, parse_id(q["customerId"], "customerId"), _limit(request))
    if "customerIds" in q:
        if "after" in q:
            raise BadRequest("after continues one customer's page: use it with customerId, not customerIds")
        customers = parse_ids(q["customerIds"], "customerIds", max_batch)
        return await _first_pages(request, customers, _limit(request))
    return await batch_response(request, ORDER, "id", parse_ids(q.get("ids"), "ids", max_batch))


def _limit(request: Request) -> int:
    return parse_int(request.query_params.get("limit"), "limit", 20, 1, context(request).max_batch)


def _page_json(rows: list[Any], limit: int, total: int) -> dict[str, Any]:
    """`rows`: up to limit + 1 orders newest first; the extra one only says a next page exists."""
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "data": [ORDER.to_json(r) for r in rows],
        "nextCursor": _cursor(rows[-1].id) if more else None,
        "totalCount": total,
    }


async def _page(request: Request, customer: int, limit: int) -> Response:
    q = request.query_params
    mine = orders.c.customer_id == customer
    page = select(orders).where(mine)
    if "after" in q:
        page = page.where(orders.c.id < _after(q["after"]))
    async with context(request).db.read() as conn:
        rows = (await conn.execute(page.order_by(orders.c.id.desc()).limit(limit + 1))).all()
        total = (await conn.execute(select(func.count()).where(mine))).scalar_one()
    return JSONResponse(_page_json(rows, limit, total))


def _first_pages_query() -> Select[Any]:
    """Each customer's first page in ONE statement, however many customers: window functions
    number each customer's orders newest first and count them, and only the first `last`
    of each come back (plain SQL:2003 windows, so SQLite >= 3.25 and PostgreSQL alike).
    Built once, like resource.rows_by."""
    ranked = select(
        orders,
        func.row_number().over(partition_by=orders.c.customer_id, order_by=orders.c.id.desc()).label("page_position"),
        func.count().over(partition_by=orders.c.customer_id).label("page_total"),
    ).where(orders.c.customer_id.in_(bindparam("customers", expanding=True))).subquery()
    return select(ranked).where(ranked.c.page_position <= bindparam("last")).order_by(ranked.c.id.desc())


_FIRST_PAGES = _first_pages_query()


async def _first_pages(request: Request, customers: list[int], limit: int) -> Response:
    """Many customers' first pages (`_first_pages_query`): limit + 1 orders each, the extra
    one saying a next page exists."""
    async with context(request).db.read() as conn:
        rows = (await conn.execute(_FIRST_PAGES, {"customers": customers, "last": limit + 1})).all()
    by_customer: dict[int, list[Any]] = {customer: [] for customer in customers}
    for row in rows:
        by_customer[row.customer_id].append(row)
    return JSONResponse({
        "data": [{"customerId": customer, **_page_json(mine, limit, mine[0].page_total if mine else 0)}
                 for customer, mine in by_customer.items()],
        "missing": [],
    })


async def create(request: Request) -> Response:
    body = await read_body(request, models.OrderCreate)
    currencies = {item.unitPrice.currency for item in body.items}
    if len(currencies) > 1:
        raise BadRequest("all items of an order must share one currency")
    items = [item.model_dump() for item in body.items]
    total = total_cents(items)  # 400 AMOUNT_OUT_OF_RANGE past what a Money can say, before anything is written
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
    if current.status == "PENDING":
        raise Conflict(f"order {current.id} is under checkout; its saga decides its status", code="CHECKOUT_IN_PROGRESS")
    if body.status not in TRANSITIONS.get(current.status, set()):
        raise Conflict(f"an order that is {current.status} cannot become {body.status}")
    if body.status in THROUGH_SAGA:
        raise Conflict(f"order {current.id} is cancelled with POST /orders/{current.id}/cancel, which refunds its payment, "
                       "cancels its shipment and gives its stock back", code="COMPENSATION_REQUIRED")


def routes(api: Api) -> None:
    add_one(api, ORDER, "/orders", "id")
    api.add("GET", "/orders", collection, params=[
        batch_query("ids"),
        query_param("customerId", "One customer's orders, newest first, a page at a time",
                    ID.schema()),
        query_param("customerIds", "Comma-separated customer ids, at most maxBatch: the first page of each, as "
                    "customerId answers it; not with ids, customerId or after", {"type": "string", "pattern": IDS_PATTERN}),
        query_param("limit", "Orders per page (per customer with customerIds); default 20",
                    {"type": "integer", "minimum": 1, "maximum": 100}),
        query_param("after", "The previous page's nextCursor; only with customerId"),
    ], summary="Orders by ids, one customer's orders newest first, or the first page of each of many customers",
            ok=(200, {"oneOf": [PAGE, batch_of(models.Order), PAGES]}))
    api.add("POST", "/orders", create, summary="Place an order", body=models.OrderCreate,
            ok=(201, models.Order))
    add_patch(api, ORDER, "/orders", "id", models.OrderPatch, changes, guard=_guard)
    checkout.routes(api)


def seed(shop: Shop) -> dict:
    return {orders: [{
        **{k: v for k, v in o.items() if k != "items"},
        "items": [{"bookId": it["bookId"], "quantity": it["quantity"], "unitPrice": money(it["unit_cents"], o["currency"]),
                   "titleAtPurchase": it["title"]} for it in o["items"]],
    } for o in shop.orders]}


# Order events name the order's customer: a reader caching a customer's pages of orders
# drops them when one of the customer's orders changes (README, "The change feed").
SPEC = ServiceSpec("orders", 8104, ("order",), metadata, routes, seed, background=checkout.resumer,
                   event_keys=(EventKey("order", "customerId", orders.c.id, orders.c.customer_id),))
