"""The checkout saga: happy path, each failure compensated back to the exact stock, the
same key never checking out twice, 50 buyers for 10 copies, no charge for a payment whose
outcome was unknown, status changes only through the saga; on SQLite and PostgreSQL. Every
scenario ends with the invariant check (saga_shop.assert_consistent) on the orders it made."""

from __future__ import annotations

import asyncio

import pytest

from saga_shop import (  # noqa: F401  (fixtures)
    assert_consistent, checkout_body, checkout_shop, database_urls, running_checkout_shop)


async def _checkout(shop, body, key="key-1"):
    async with shop.client("orders") as orders:
        return await orders.post("/checkouts", json=body, headers={"Idempotency-Key": key})


async def _read(shop, service, path, **params):
    async with shop.client(service) as client:
        response = await client.get(path, params=params or None)
        assert response.status_code == 200, response.text
        return response.json()


async def _state(shop, order_id):
    """What each service holds for an order, read through its own API."""
    payments = (await _read(shop, "payments", "/payments", orderIds=str(order_id)))["data"]
    shipments = (await _read(shop, "shipping", "/shipments", orderIds=str(order_id)))["data"]
    return {
        "order": (await _read(shop, "orders", f"/orders/{order_id}"))["status"],
        "payments": sorted(p["status"] for p in payments),
        "shipments": sorted(s["status"] for s in shipments),
    }


async def test_checkout_happy_path_pays_reserves_and_ships(checkout_shop):
    """A checkout ends PAID: titles and prices from the catalog, stock taken, payment captured, shipment made."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    await shop.set_stock(12, 5)
    books = {b["id"]: b for b in (await _read(shop, "catalog", "/books", ids="11,12"))["data"]}
    answer = await _checkout(shop, checkout_body([(11, 2), (12, 1)]))
    assert answer.status_code == 201, answer.text
    checkout = answer.json()
    assert (checkout["status"], checkout["reason"], checkout["compensationsOwed"]) == ("COMPLETED", None, [])
    order = await _read(shop, "orders", f"/orders/{checkout['orderId']}")
    assert order["status"] == "PAID"
    assert [(i["bookId"], i["quantity"], i["titleAtPurchase"], i["unitPrice"]) for i in order["items"]] == [
        (11, 2, books[11]["title"], books[11]["price"]), (12, 1, books[12]["title"], books[12]["price"])]
    assert await shop.available(11, 12) == [3, 4]
    reservation = await _read(shop, "inventory", f"/reservations/{checkout['reservationId']}")
    assert (reservation["status"], reservation["orderId"]) == ("CONFIRMED", order["id"])
    payment = await _read(shop, "payments", f"/payments/{checkout['paymentId']}")
    assert (payment["status"], payment["amount"], payment["orderId"]) == ("CAPTURED", order["total"], order["id"])
    shipment = await _read(shop, "shipping", f"/shipments/{checkout['shipmentId']}")
    assert (shipment["status"], shipment["orderId"]) == ("PENDING", order["id"])
    assert await _read(shop, "orders", f"/checkouts/{checkout['id']}") == checkout
    await assert_consistent(shop.read, order["id"], checkout["id"])


async def test_declined_payment_cancels_and_releases_the_stock(checkout_shop):
    """A declined card: CANCELLED with PAYMENT_DECLINED, the payment FAILED, stock back exactly, no shipment."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    answer = await _checkout(shop, checkout_body([(11, 2)], method="card-declined"))
    checkout = answer.json()
    assert (answer.status_code, checkout["status"], checkout["reason"]) == (201, "CANCELLED", "PAYMENT_DECLINED")
    assert await _state(shop, checkout["orderId"]) == {"order": "CANCELLED", "payments": ["FAILED"], "shipments": []}
    assert (await _read(shop, "inventory", f"/reservations/{checkout['reservationId']}"))["status"] == "RELEASED"
    assert await shop.available(11) == [5]
    await assert_consistent(shop.read, checkout["orderId"], checkout["id"])


async def test_out_of_stock_cancels_before_any_payment(checkout_shop):
    """One book short: CANCELLED with OUT_OF_STOCK, nothing charged, no stock moved."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    await shop.set_stock(12, 1)
    checkout = (await _checkout(shop, checkout_body([(11, 1), (12, 2)]))).json()
    assert (checkout["status"], checkout["reason"], checkout["reservationId"]) == ("CANCELLED", "OUT_OF_STOCK", None)
    assert await _state(shop, checkout["orderId"]) == {"order": "CANCELLED", "payments": [], "shipments": []}
    assert await shop.available(11, 12) == [5, 1]
    await assert_consistent(shop.read, checkout["orderId"], checkout["id"])


async def test_shipping_down_refunds_and_releases_then_settles_when_it_is_back(checkout_shop):
    """Shipping down: refund and release at once, the checkout owes only the shipment; once back, CANCELLED."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    await shop.faults("shipping", errorRate=1.0, errorStatus=503, paths=["/shipments"])
    body = checkout_body([(11, 3)])
    pending = await _checkout(shop, body)
    assert pending.status_code == 202
    assert (pending.json()["status"], pending.json()["reason"]) == ("COMPENSATING", "SHIPPING_UNAVAILABLE")
    assert pending.json()["compensationsOwed"] == ["ship"]
    assert await shop.available(11) == [5]
    order_id = pending.json()["orderId"]
    assert (await _read(shop, "payments", "/payments", orderIds=str(order_id)))["data"][0]["status"] == "REFUNDED"

    await shop.faults("shipping")  # back
    settled = await _checkout(shop, body)  # the same key drives the saga on
    assert settled.status_code == 201
    assert (settled.json()["status"], settled.json()["reason"]) == ("CANCELLED", "SHIPPING_UNAVAILABLE")
    # The shipment that may have been made was looked up by its key and cancelled.
    state = await _state(shop, order_id)
    assert state["order"] == "CANCELLED" and state["payments"] == ["REFUNDED"]
    assert set(state["shipments"]) <= {"CANCELLED"}
    assert await shop.available(11) == [5]
    await assert_consistent(shop.read, order_id, settled.json()["id"])


async def test_inventory_down_mid_saga_undoes_payment_and_shipment(checkout_shop):
    """Inventory fails the confirm step: shipment cancelled, payment refunded, reservation released, stock exact."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    await shop.faults("inventory", errorRate=1.0, errorStatus=503, paths=["/reservations/"], count=3)
    checkout = (await _checkout(shop, checkout_body([(11, 4)]))).json()
    assert (checkout["status"], checkout["reason"]) == ("CANCELLED", "INVENTORY_UNAVAILABLE")
    assert checkout["attempts"] == 2  # tried again twice, three calls in all
    assert await _state(shop, checkout["orderId"]) == {
        "order": "CANCELLED", "payments": ["REFUNDED"], "shipments": ["CANCELLED"]}
    assert (await _read(shop, "inventory", f"/reservations/{checkout['reservationId']}"))["status"] == "RELEASED"
    assert await shop.available(11) == [5]
    await assert_consistent(shop.read, checkout["orderId"], checkout["id"])


async def test_fifty_checkouts_for_ten_copies_sell_exactly_ten(checkout_shop):
    """50 concurrent checkouts of the last 10 copies: 10 PAID, 40 OUT_OF_STOCK, stock 0, 10 captures."""
    shop = checkout_shop
    await shop.set_stock(11, 10)
    answers = await asyncio.gather(*(_checkout(shop, checkout_body([(11, 1)], customer=n % 200 + 1), key=f"buyer-{n}")
                                     for n in range(50)))
    results = [(a.status_code, a.json()["status"], a.json()["reason"]) for a in answers]
    assert sorted(results) == sorted([(201, "COMPLETED", None)] * 10 + [(201, "CANCELLED", "OUT_OF_STOCK")] * 40)
    assert await shop.available(11) == [0]
    order_ids = ",".join(str(a.json()["orderId"]) for a in answers)
    payments = (await _read(shop, "payments", "/payments", orderIds=order_ids))["data"]
    assert sorted(p["status"] for p in payments) == ["CAPTURED"] * 10
    for answer in answers:
        await assert_consistent(shop.read, answer.json()["orderId"], answer.json()["id"])


async def test_same_key_in_parallel_checks_out_once(checkout_shop):
    """Five identical checkouts with one key at once: one order, one reservation, one capture, one answer."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    before = (await _read(shop, "orders", "/orders", customerId="7"))["totalCount"]
    answers = await asyncio.gather(*(_checkout(shop, checkout_body([(11, 2)])) for _ in range(5)))
    assert {(a.status_code, a.text) for a in answers} == {(201, answers[0].text)}
    assert (await _read(shop, "orders", "/orders", customerId="7"))["totalCount"] == before + 1
    assert await shop.available(11) == [3]
    order_id = answers[0].json()["orderId"]
    assert (await _state(shop, order_id))["payments"] == ["CAPTURED"]
    await assert_consistent(shop.read, order_id, answers[0].json()["id"])


async def test_same_key_with_another_body_is_refused(checkout_shop, error_of):
    """A key reused for another checkout is a 422 IDEMPOTENCY_KEY_REUSED and orders nothing."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    first = await _checkout(shop, checkout_body([(11, 1)]))
    assert first.status_code == 201
    assert error_of(await _checkout(shop, checkout_body([(11, 2)]))) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert await shop.available(11) == [4]
    await assert_consistent(shop.read, first.json()["orderId"], first.json()["id"])


async def test_checkout_input_errors_order_nothing(checkout_shop, error_of):
    """No key: 400; an unknown book: 422 UNKNOWN_BOOK; catalog down: 503 CATALOG_UNAVAILABLE; no order made."""
    shop = checkout_shop
    async with shop.client("orders") as orders:
        seq = (await orders.get("/events")).json()["latest"]
        assert error_of(await orders.post("/checkouts", json=checkout_body([(11, 1)]))) == (400, "IDEMPOTENCY_KEY_REQUIRED")
        assert error_of(await _checkout(shop, checkout_body([(999999, 1)]), key="a")) == (422, "UNKNOWN_BOOK")
        await shop.faults("catalog", errorRate=1.0, errorStatus=503)
        assert error_of(await _checkout(shop, checkout_body([(11, 1)]), key="b")) == (503, "CATALOG_UNAVAILABLE")
        assert (await orders.get("/events", params={"after": seq})).json()["events"] == []  # no order: nothing to check


async def test_cancel_a_paid_checkout_refunds_restocks_and_cancels_the_shipment(checkout_shop):
    """POST /orders/{id}/cancel on a PAID checkout: CANCELLED, refunded, shipment cancelled, stock back."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    checkout = (await _checkout(shop, checkout_body([(11, 2)]))).json()
    assert await shop.available(11) == [3]
    async with shop.client("orders") as orders:
        cancelled = await orders.post(f"/orders/{checkout['orderId']}/cancel")
        assert (cancelled.status_code, cancelled.json()["status"]) == (200, "CANCELLED")
        again = await orders.post(f"/orders/{checkout['orderId']}/cancel")
        assert (again.status_code, again.json()) == (200, cancelled.json())
    assert await _state(shop, checkout["orderId"]) == {
        "order": "CANCELLED", "payments": ["REFUNDED"], "shipments": ["CANCELLED"]}
    assert await shop.available(11) == [5]
    assert (await _read(shop, "orders", f"/checkouts/{checkout['id']}"))["reason"] == "CANCELLED_BY_CUSTOMER"
    await assert_consistent(shop.read, checkout["orderId"], checkout["id"])


async def test_cancel_a_demo_order_refunds_its_payment(checkout_shop, error_of):
    """A PAID demo order (no checkout) is cancelled with its payment refunded; a SHIPPED one is a 409."""
    shop = checkout_shop
    demo = (await _read(shop, "orders", "/orders", ids=",".join(str(i) for i in range(4901, 5001))))["data"]
    paid = next(o for o in demo if o["status"] == "PAID")
    shipped = next(o for o in demo if o["status"] == "SHIPPED")
    async with shop.client("orders") as orders:
        assert (await orders.post(f"/orders/{paid['id']}/cancel")).json()["status"] == "CANCELLED"
        assert error_of(await orders.post(f"/orders/{shipped['id']}/cancel")) == (409, "NOT_CANCELLABLE")
    assert (await _state(shop, paid["id"]))["payments"] == ["REFUNDED"]
    for order in (paid, shipped):
        await assert_consistent(shop.read, order["id"])


async def test_a_direct_patch_to_cancelled_is_refused_and_changes_nothing(checkout_shop, error_of):
    """PATCH {"status": "CANCELLED"} on a PAID checkout or a PLACED order: 409 COMPENSATION_REQUIRED, nothing written."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    checkout = (await _checkout(shop, checkout_body([(11, 2)]))).json()
    placed = next(o for o in (await _read(shop, "orders", "/orders", ids=",".join(map(str, range(4901, 5001)))))["data"]
                  if o["status"] == "PLACED")
    async with shop.client("orders") as orders:
        seq = (await orders.get("/events")).json()["latest"]
        for order_id in (checkout["orderId"], placed["id"]):
            refused = await orders.patch(f"/orders/{order_id}", json={"status": "CANCELLED"})
            assert error_of(refused) == (409, "COMPENSATION_REQUIRED")
            assert f"/orders/{order_id}/cancel" in refused.json()["error"]["message"]
        assert (await orders.get("/events", params={"after": seq})).json()["events"] == []
    assert await _state(shop, checkout["orderId"]) == {"order": "PAID", "payments": ["CAPTURED"], "shipments": ["PENDING"]}
    assert await shop.available(11) == [3]
    await assert_consistent(shop.read, checkout["orderId"], checkout["id"])
    await assert_consistent(shop.read, placed["id"])


async def test_cancel_repairs_an_order_cancelled_past_its_saga(checkout_shop, databases, error_of):
    """A PAID order set CANCELLED behind the saga's back (payment CAPTURED, shipment PENDING, stock held): cancel undoes all three."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    checkout = (await _checkout(shop, checkout_body([(11, 2)]))).json()
    order_id = checkout["orderId"]
    # What a PATCH to CANCELLED did before it was refused (issue 24).
    await databases.execute("orders", f"UPDATE orders SET status = 'CANCELLED' WHERE id = {order_id}")
    with pytest.raises(AssertionError):  # the invariant check sees it
        await assert_consistent(shop.read, order_id, checkout["id"])
    async with shop.client("orders") as orders:
        repaired = await orders.post(f"/orders/{order_id}/cancel")
        assert (repaired.status_code, repaired.json()["status"]) == (200, "CANCELLED")
        assert await _state(shop, order_id) == {"order": "CANCELLED", "payments": ["REFUNDED"], "shipments": ["CANCELLED"]}
        assert await shop.available(11) == [5]
        await assert_consistent(shop.read, order_id, checkout["id"])
        # Nothing left to undo: the next cancel asks, and writes nothing anywhere.
        seqs = {name: (await _read(shop, name, "/events"))["latest"] for name in ("orders", "payments", "inventory", "shipping")}
        again = await orders.post(f"/orders/{order_id}/cancel")
        assert (again.status_code, again.json()) == (200, repaired.json())
    assert {name: (await _read(shop, name, "/events"))["latest"] for name in seqs} == seqs


async def test_payments_down_during_checkout_charges_nothing(checkout_shop):
    """Payments failing through the pay step and its undo: the order ends CANCELLED with no payment at all, not captured then refunded."""
    shop = checkout_shop
    await shop.set_stock(11, 5)
    await shop.faults("payments", errorRate=1.0, errorStatus=503, paths=["/payments", "/payment-voids"])
    body = checkout_body([(11, 2)])
    pending = (await _checkout(shop, body)).json()
    assert (pending["status"], pending["reason"], pending["compensationsOwed"]) == (
        "COMPENSATING", "PAYMENTS_UNAVAILABLE", ["pay"])
    assert await shop.available(11) == [5]  # the stock is given back without waiting for payments
    await shop.faults("payments")  # back: the same key drives the saga on
    settled = await _checkout(shop, body)
    assert (settled.status_code, settled.json()["status"], settled.json()["paymentId"]) == (201, "CANCELLED", None)
    assert await _state(shop, pending["orderId"]) == {"order": "CANCELLED", "payments": [], "shipments": []}
    await assert_consistent(shop.read, pending["orderId"], pending["id"])


class Answered:
    """An ASGI app whose answered requests are noted, with a condition to await them by."""

    def __init__(self, app) -> None:
        self.app = app
        self.requests: list[tuple[str, str]] = []
        self.changed = asyncio.Condition()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                async with self.changed:
                    self.requests.append((scope["method"], scope["path"]))
                    self.changed.notify_all()


async def test_a_capture_arriving_after_its_void_never_charges(database_urls):
    """Payments slower than the saga's timeout: the saga voids the key, and the three captures arriving late are refused, not made."""
    # The saga waits 0.2 s for payments (a real socket: httpx's timeouts apply); payments takes 1.5 s.
    async with running_checkout_shop(database_urls, on_sockets={"payments": Answered}, timeout_s=0.2) as shop:
        answered = shop.served["payments"]
        await shop.set_stock(11, 5)
        await shop.faults("payments", latencyMs=1500, paths=["/payments"], count=3)  # the three tries of the pay step
        checkout = (await _checkout(shop, checkout_body([(11, 2)]))).json()
        assert (checkout["status"], checkout["reason"], checkout["paymentId"]) == ("CANCELLED", "PAYMENTS_UNAVAILABLE", None)
        async with answered.changed:  # the late captures, each answered by now
            await asyncio.wait_for(answered.changed.wait_for(
                lambda: answered.requests.count(("POST", "/payments")) == 3), 10)
        assert await _state(shop, checkout["orderId"]) == {"order": "CANCELLED", "payments": [], "shipments": []}
        assert await shop.available(11) == [5]
        await assert_consistent(shop.read, checkout["orderId"], checkout["id"])


async def test_void_answers_what_a_keyed_capture_came_to(checkout_shop, error_of):
    """POST /payment-voids: an unknown key is voided (a late capture is refused 409 PAYMENT_VOIDED); a made one is answered as it is."""
    def capture(order: int, method: str = "card") -> dict:
        return {"orderId": order, "amount": {"amount": "12.50", "currency": "EUR"}, "method": method}

    async with checkout_shop.client("payments") as payments:
        voided = await payments.post("/payment-voids", json={"key": "late", "payment": capture(900001)})
        assert voided.json() == {"key": "late", "outcome": "VOIDED", "payment": None}
        late = await payments.post("/payments", json=capture(900001), headers={"Idempotency-Key": "late"})
        assert error_of(late) == (409, "PAYMENT_VOIDED")
        assert (await payments.get("/payments", params={"orderIds": "900001"})).json()["data"] == []
        again = await payments.post("/payment-voids", json={"key": "late", "payment": capture(900001)})
        assert again.json() == voided.json()

        made = await payments.post("/payments", json=capture(900002), headers={"Idempotency-Key": "made"})
        asked = await payments.post("/payment-voids", json={"key": "made", "payment": capture(900002)})
        assert asked.json() == {"key": "made", "outcome": "CREATED", "payment": made.json()}
        declined = await payments.post("/payments", json=capture(900003, "card-declined"), headers={"Idempotency-Key": "no"})
        refused = (await payments.post("/payment-voids", json={"key": "no", "payment": capture(900003, "card-declined")})).json()
        assert (refused["outcome"], refused["payment"]["status"]) == ("REFUSED", "FAILED")
        assert declined.status_code == 402
        other = await payments.post("/payment-voids", json={"key": "made", "payment": capture(900009)})
        assert error_of(other) == (422, "IDEMPOTENCY_KEY_REUSED")
        assert error_of(await payments.post("/payment-voids", json={"key": "", "payment": capture(1)})) == (400, "BAD_REQUEST")
