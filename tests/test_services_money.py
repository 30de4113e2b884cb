"""Money that fits (issue 24): every amount up to the Money pattern's maximum (999999999.99) is
stored and read back on both backends; a total past it is a 400 AMOUNT_OUT_OF_RANGE that writes
nothing, never a 500 and never an answer that breaks the service's own document."""

from __future__ import annotations

from mock_services.models import AMOUNT
from saga_shop import checkout_body, checkout_shop, database_urls  # noqa: F401  (fixtures)

MAX = "999999999.99"


def _item(book: int, quantity: int, amount: str) -> dict:
    return {"bookId": book, "quantity": quantity, "unitPrice": {"amount": amount, "currency": "EUR"},
            "titleAtPurchase": "A book"}


async def _feed_head(client) -> int:
    return (await client.get("/events", params={"after": 0, "limit": 1})).json()["latest"]


async def test_the_largest_price_is_stored_and_read_back(catalog):
    """PATCH /books/1 to 999999999.99 (past 32 bits in cents) answers it, and every later read says the same."""
    response = await catalog.patch("/books/1", json={"price": {"amount": MAX, "currency": "EUR"}})
    assert response.status_code == 200, response.text
    assert response.json()["price"] == {"amount": MAX, "currency": "EUR"}
    assert (await catalog.get("/books/1")).json()["price"]["amount"] == MAX
    assert [b["price"]["amount"] for b in (await catalog.get("/books", params={"ids": "1"})).json()["data"]] == [MAX]


async def test_a_large_order_within_the_maximum_is_placed_exactly(orders):
    """POST /orders of 1,000 x 999,999.99 + 1 x 9.99 (10**11 cents, past 32 bits) is placed with that total, to the cent."""
    response = await orders.post("/orders", json={"customerId": 7, "items": [_item(3, 1000, "999999.99"),
                                                                             _item(4, 1, "9.99")]})
    assert response.status_code == 201, response.text
    assert response.json()["total"] == {"amount": "999999999.99", "currency": "EUR"}
    again = (await orders.get(f"/orders/{response.json()['id']}")).json()
    assert again["total"]["amount"] == "999999999.99" and AMOUNT.matches(again["total"]["amount"])


async def test_an_order_total_past_the_maximum_is_refused_and_writes_nothing(orders, error_of):
    """A total one cent over 999999999.99 (and one of 10**12) is a 400 AMOUNT_OUT_OF_RANGE; no order, no event."""
    before = (await orders.get("/orders", params={"customerId": 7, "limit": 1})).json()["totalCount"]
    head = await _feed_head(orders)
    for items in ([_item(3, 1000, "999999.99"), _item(4, 1, "10.00")], [_item(3, 1000, MAX), _item(4, 1000, MAX)]):
        response = await orders.post("/orders", json={"customerId": 7, "items": items})
        assert error_of(response) == (400, "AMOUNT_OUT_OF_RANGE"), response.text
        assert "999999999.99" in response.json()["error"]["message"]
    assert (await orders.get("/orders", params={"customerId": 7, "limit": 1})).json()["totalCount"] == before
    assert await _feed_head(orders) == head


async def test_a_checkout_of_a_thousand_copies_at_thirty_thousand_is_priced_exactly(checkout_shop):
    """1,000 x 30,000.00 (3 * 10**9 cents, the issue's 500 on PostgreSQL) makes an order with that total."""
    async with checkout_shop.client("catalog") as catalog:
        assert (await catalog.patch("/books/21", json={"price": {"amount": "30000.00", "currency": "EUR"}})).status_code == 200
    async with checkout_shop.client("orders") as orders:
        response = await orders.post("/checkouts", json=checkout_body([(21, 1000)]), headers={"Idempotency-Key": "k-big"})
        assert response.status_code == 201, response.text
        order = (await orders.get(f"/orders/{response.json()['orderId']}")).json()
    assert order["total"] == {"amount": "30000000.00", "currency": "EUR"}


async def test_a_checkout_past_the_maximum_is_refused_before_any_order(checkout_shop, error_of):
    """Two copies at 999999999.99: 400 AMOUNT_OUT_OF_RANGE, no order, no saga, nothing reserved or charged."""
    async with checkout_shop.client("catalog") as catalog:
        assert (await catalog.patch("/books/22", json={"price": {"amount": MAX, "currency": "EUR"}})).status_code == 200
    await checkout_shop.set_stock(22, 5)
    heads = {}
    for name in ("orders", "inventory", "payments", "shipping"):
        async with checkout_shop.client(name) as client:
            heads[name] = await _feed_head(client)
    async with checkout_shop.client("orders") as orders:
        response = await orders.post("/checkouts", json=checkout_body([(22, 2)]), headers={"Idempotency-Key": "k-over"})
    assert error_of(response) == (400, "AMOUNT_OUT_OF_RANGE"), response.text
    for name, head in heads.items():  # not one event anywhere: no order, no reservation, no payment, no shipment
        async with checkout_shop.client(name) as client:
            assert await _feed_head(client) == head, name
    assert await checkout_shop.available(22) == [5]
