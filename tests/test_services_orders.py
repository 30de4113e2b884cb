"""A customer's orders, newest first, by cursor: GET /orders?customerId=&limit=&after=."""

from __future__ import annotations

import base64

import pytest

from mock_services.demo_data import shop

CUSTOMER = 25  # 38 orders in the scale-1 demo data
ITEM = {"bookId": 1, "quantity": 1, "unitPrice": {"amount": "3", "currency": "EUR"}, "titleAtPurchase": "New"}


async def _walk(client, customer: int, limit: int) -> list[dict]:
    pages, cursor = [], None
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
