"""A customer's orders, newest first, by cursor: GET /orders?customerId=&limit=&after=; and the
first page of many customers in one call: GET /orders?customerIds=&limit=."""

from __future__ import annotations

import base64

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mock_services.demo_data import shop

CUSTOMER = 25  # 38 orders in the scale-1 demo data
ITEM = {"bookId": 1, "quantity": 1, "unitPrice": {"amount": "3", "currency": "EUR"}, "titleAtPurchase": "New"}


async def _walk(client, customer: int, limit: int, cursor: str | None = None) -> list[dict]:
    pages: list[dict] = []
    while True:
        params = {"customerId": customer, "limit": limit} | ({"after": cursor} if cursor else {})
        response = await client.get("/orders", params=params)
        assert response.status_code == 200
        pages.append(response.json())
        cursor = pages[-1]["nextCursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100


async def test_pages_are_disjoint_newest_first_and_cover_total_count(orders):
    """Walking by cursor yields each of the customer's orders once, newest first, totalCount in all."""
    expected = sorted((o["id"] for o in shop(1).orders if o["customer_id"] == CUSTOMER), reverse=True)
    assert len(expected) == 38
    pages = await _walk(orders, CUSTOMER, limit=7)
    assert [len(p["data"]) for p in pages] == [7, 7, 7, 7, 7, 3]
    assert {p["totalCount"] for p in pages} == {38}
    ids = [o["id"] for p in pages for o in p["data"]]
    assert ids == expected  # disjoint, complete, newest first
    assert {o["customerId"] for p in pages for o in p["data"]} == {CUSTOMER}
    placed = [o["placedAt"] for p in pages for o in p["data"]]
    assert placed == sorted(placed, reverse=True)


async def test_default_page_is_twenty_and_an_exact_fit_has_no_next_cursor(orders):
    """No limit gives 20 orders; a limit equal to the total gives all of them and nextCursor null."""
    first = (await orders.get("/orders", params={"customerId": CUSTOMER})).json()
    assert len(first["data"]) == 20 and first["nextCursor"]
    whole = (await orders.get("/orders", params={"customerId": CUSTOMER, "limit": 38})).json()
    assert len(whole["data"]) == 38 and whole["nextCursor"] is None


async def test_new_order_comes_first_and_does_not_shift_later_pages(orders):
    """An order placed mid-walk shows on page one; the cursor in hand still continues where it was."""
    page1 = (await orders.get("/orders", params={"customerId": CUSTOMER, "limit": 5})).json()
    created = (await orders.post("/orders", json={"customerId": CUSTOMER, "items": [ITEM]})).json()
    page2 = (await orders.get("/orders", params={"customerId": CUSTOMER, "limit": 5, "after": page1["nextCursor"]})).json()
    assert page2["data"][0]["id"] < page1["data"][-1]["id"]
    assert page2["totalCount"] == 39
    fresh = (await orders.get("/orders", params={"customerId": CUSTOMER, "limit": 1})).json()
    assert fresh["data"][0]["id"] == created["id"]


async def test_customer_without_orders_gets_an_empty_page(orders):
    """A customer with no orders gets data [] with totalCount 0, not a 404."""
    assert (await orders.get("/orders", params={"customerId": 999_999})).json() == {
        "data": [], "nextCursor": None, "totalCount": 0,
    }


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", ["", "bad", "!!!", _b64("order:abc"), _b64("order:0"), _b64("order:-5"),
                                    _b64("book:10"), _b64("order:" + "9" * 30), "é"])
async def test_bad_cursor_is_400(orders, error_of, cursor):
    """A cursor the service did not issue is a 400 with the error body."""
    response = await orders.get("/orders", params={"customerId": CUSTOMER, "after": cursor})
    assert error_of(response) == (400, "BAD_REQUEST")
    assert "cursor" in response.json()["error"]["message"]


async def test_customer_ids_answers_each_customers_first_page_as_customer_id_does(orders):
    """customerIds gives, per customer in order, exactly the customerId page: orders, nextCursor, totalCount."""
    customers = [CUSTOMER, 999_999, 1, CUSTOMER, 2]  # 999999 has no orders; CUSTOMER twice
    response = await orders.get("/orders", params={"customerIds": ",".join(map(str, customers)), "limit": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["missing"] == []
    assert [page["customerId"] for page in body["data"]] == [CUSTOMER, 999_999, 1, 2]
    for page in body["data"]:
        alone = (await orders.get("/orders", params={"customerId": page["customerId"], "limit": 5})).json()
        assert {k: v for k, v in page.items() if k != "customerId"} == alone
    assert body["data"][0]["totalCount"] == 38 and len(body["data"][0]["data"]) == 5
    assert body["data"][1] == {"customerId": 999_999, "data": [], "nextCursor": None, "totalCount": 0}


async def test_customer_ids_page_continues_with_customer_id_and_after(orders):
    """A customerIds page's nextCursor, passed as after with customerId, walks the rest of that customer's orders."""
    first = (await orders.get("/orders", params={"customerIds": f"{CUSTOMER},1"})).json()["data"][0]
    assert len(first["data"]) == 20  # the default limit, as with customerId
    rest = await _walk(orders, CUSTOMER, 7, first["nextCursor"])
    ids = [o["id"] for o in first["data"]] + [o["id"] for p in rest for o in p["data"]]
    assert ids == sorted((o["id"] for o in shop(1).orders if o["customer_id"] == CUSTOMER), reverse=True)


async def test_customer_ids_is_one_request_in_the_stats_with_its_id_count(service):
    """One customerIds call shows in /_admin/stats as one request on /orders naming each distinct id once."""
    client = await service("orders", admin=True)
    await client.delete("/_admin/stats")
    assert (await client.get("/orders", params={"customerIds": "1,2,3,2", "limit": 3})).status_code == 200
    [record] = (await client.get("/_admin/stats")).json()["requests"]
    assert (record["route"], record["ids"], record["status"]) == ("/orders", 3, 200)


@pytest.mark.parametrize("params", [
    {"customerIds": "1,2", "after": _b64("order:100")},
    {"customerIds": "1,2", "ids": "3"},
    {"customerIds": "1,2", "customerId": "3"},
    {"customerIds": "1,2", "limit": "0"},
    {"customerIds": "1,2", "limit": "101"},
    {"customerIds": ",".join(map(str, range(1, 102)))},
    {"customerIds": "1,x"}, {"customerIds": "0"}, {"customerIds": ""}, {"customerIds": "1,,2"},
], ids=lambda p: "&".join(f"{k}={v[:12]}" for k, v in p.items()))
async def test_bad_customer_ids_request_is_400(orders, error_of, params):
    """after, ids or customerId beside customerIds, a bad limit, too many or garbage ids: 400 with the error body."""
    response = await orders.get("/orders", params=params)
    assert error_of(response) == (400, "BAD_REQUEST")


async def test_customer_ids_costs_one_sql_statement_however_many_customers(service):
    """The pages of 2 or 100 customers come from the same number of SQL queries (one SELECT of orders), per the SQL spans."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    client = await service("orders", tracer_provider=provider)
    statements = []
    for count in (2, 100):
        spans.clear()
        ids = ",".join(str(c) for c in range(1, count + 1))
        assert (await client.get("/orders", params={"customerIds": ids, "limit": 3})).status_code == 200
        # The answer's feed position (X-Feed-Seq) is one more read, of the outbox, whatever the count.
        statements.append(sum(s.kind is SpanKind.CLIENT and s.attributes["db.operation.name"] == "SELECT"
                              and "outbox" not in s.attributes["db.query.text"] for s in spans.get_finished_spans()))
    assert statements == [1, 1]
