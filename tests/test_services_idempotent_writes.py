"""Reservations, payments and shipments: one local transaction each, replayed under an
Idempotency-Key, all-or-none stock holds that never drive `available` below zero."""

from __future__ import annotations

import asyncio

import pytest

ADDRESS = {"name": "Ada Okafor", "street": "Keizersgracht 1", "city": "Amsterdam", "postalCode": "1015", "country": "NL"}


async def _available(inventory, *books: int) -> list[int]:
    body = (await inventory.get("/stock", params={"bookIds": ",".join(map(str, books))})).json()
    by_id = {s["bookId"]: s["available"] for s in body["data"]}
    return [by_id[b] for b in books]


async def _stock(inventory, book: int, available: int) -> None:
    assert (await inventory.patch(f"/stock/{book}", json={"available": available})).status_code == 200


async def test_reservation_holds_every_book_and_release_gives_it_back(service):
    """A reservation of two books lowers both `available`s; releasing it restores them exactly."""
    inventory = await service("inventory")
    await _stock(inventory, 3, 5)
    await _stock(inventory, 4, 2)
    held = await inventory.post("/reservations", json={"items": [{"bookId": 3, "quantity": 2}, {"bookId": 4, "quantity": 2}],
                                                        "orderId": 77})
    assert held.status_code == 201
    assert (held.json()["status"], held.json()["orderId"]) == ("HELD", 77)
    assert await _available(inventory, 3, 4) == [3, 0]
    released = await inventory.post(f"/reservations/{held.json()['id']}/release")
    assert released.json()["status"] == "RELEASED"
    assert await _available(inventory, 3, 4) == [5, 2]
    again = await inventory.post(f"/reservations/{held.json()['id']}/release")
    assert (again.status_code, again.json()["status"]) == (200, "RELEASED")
    assert await _available(inventory, 3, 4) == [5, 2]


async def test_reservation_short_of_one_book_holds_none_and_names_it(service, error_of):
    """All or none: one short book is a 409 OUT_OF_STOCK naming it, and no stock moves."""
    inventory = await service("inventory")
    await _stock(inventory, 3, 5)
    await _stock(inventory, 4, 1)
    seq = (await inventory.get("/events")).json()["latest"]
    refused = await inventory.post("/reservations", json={"items": [{"bookId": 3, "quantity": 1}, {"bookId": 4, "quantity": 2}]})
    assert error_of(refused) == (409, "OUT_OF_STOCK")
    assert refused.json()["error"]["details"] == [{"bookId": "4", "requested": "2", "available": "1"}]
    assert await _available(inventory, 3, 4) == [5, 1]
    assert (await inventory.get("/events", params={"after": seq})).json()["events"] == []


async def test_confirmed_reservation_keeps_stock_and_cannot_expire(service):
    """Confirm keeps the stock taken; confirming twice answers the same CONFIRMED reservation."""
    inventory = await service("inventory", options={"reservation_ttl_s": 0})
    await _stock(inventory, 3, 5)
    held = (await inventory.post("/reservations", json={"items": [{"bookId": 3, "quantity": 1}]})).json()
    # A TTL of 0 is past at once: the confirm finds the hold expired and gives the stock back.
    late = await inventory.post(f"/reservations/{held['id']}/confirm")
    assert (late.status_code, late.json()["error"]["code"]) == (409, "RESERVATION_EXPIRED")
    assert await _available(inventory, 3) == [5]


async def test_unconfirmed_reservation_expires_with_its_event(service):
    """A hold past its TTL is released by the sweep, with a reservation.expired event, and its stock returns."""
    inventory = await service("inventory", options={"reservation_ttl_s": 0.05, "reservation_sweep_s": 0.02})
    await _stock(inventory, 3, 5)
    seq = (await inventory.get("/events")).json()["latest"]
    held = (await inventory.post("/reservations", json={"items": [{"bookId": 3, "quantity": 4}]})).json()
    events: list[dict] = []
    while not any(e["type"] == "reservation.expired" for e in events):
        page = (await inventory.get("/events", params={"after": seq, "wait": "5"})).json()
        events += page["events"]
        seq = page["next"]
    assert (await inventory.get(f"/reservations/{held['id']}")).json()["status"] == "EXPIRED"
    assert await _available(inventory, 3) == [5]


async def test_concurrent_reservations_never_oversell(service):
    """30 reservations of 1 copy at once for the last 10: exactly 10 succeed, stock ends at 0."""
    inventory = await service("inventory")
    await _stock(inventory, 3, 10)
    answers = await asyncio.gather(*(inventory.post("/reservations", json={"items": [{"bookId": 3, "quantity": 1}]})
                                     for _ in range(30)))
    assert sorted(r.status_code for r in answers) == [201] * 10 + [409] * 20
    assert await _available(inventory, 3) == [0]


# PostgreSQL only: a SQLite file has one writing process (two answer "database is locked"
# when a transaction that read first finds another's commit); several apps on one
# PostgreSQL database are what a replicated deployment would run.
@pytest.mark.parametrize("backend", ["postgresql"])
async def test_two_apps_on_one_database_never_oversell(service):
    """30 reservations of the last 10 copies, spread over two inventory apps on one database: 10 held, stock 0."""
    first, second = await service("inventory"), await service("inventory")
    await _stock(first, 3, 10)
    # Each app serialises its own writes; across the two only the conditional UPDATE holds the line.
    answers = await asyncio.gather(*((first, second)[n % 2].post("/reservations", json={"items": [{"bookId": 3, "quantity": 1}]})
                                     for n in range(30)))
    assert sorted(r.status_code for r in answers) == [201] * 10 + [409] * 20
    assert await _available(first, 3) == await _available(second, 3) == [0]


async def test_same_key_replays_the_first_answer_without_a_second_hold(service, error_of):
    """The same Idempotency-Key twice (and in parallel) holds once; another body with it is a 422."""
    inventory = await service("inventory")
    await _stock(inventory, 3, 5)
    body = {"items": [{"bookId": 3, "quantity": 2}]}
    answers = await asyncio.gather(*(inventory.post("/reservations", json=body, headers={"Idempotency-Key": "k-1"})
                                     for _ in range(5)))
    assert {(r.status_code, r.text) for r in answers} == {(201, answers[0].text)}
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 4
    assert await _available(inventory, 3) == [3]
    other = await inventory.post("/reservations", json={"items": [{"bookId": 3, "quantity": 1}]},
                                 headers={"Idempotency-Key": "k-1"})
    assert error_of(other) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert await _available(inventory, 3) == [3]


async def test_replayed_out_of_stock_stays_an_out_of_stock(service):
    """A 409 is a result too: the same key answers the same 409 even once stock arrived."""
    inventory = await service("inventory")
    await _stock(inventory, 3, 0)
    body, key = {"items": [{"bookId": 3, "quantity": 1}]}, {"Idempotency-Key": "k-2"}
    first = await inventory.post("/reservations", json=body, headers=key)
    await _stock(inventory, 3, 5)
    second = await inventory.post("/reservations", json=body, headers=key)
    assert (second.status_code, second.text) == (first.status_code, first.text) == (409, first.text)
    assert await _available(inventory, 3) == [5]


async def test_declined_payment_is_a_402_kept_as_failed(service, error_of):
    """A declined card answers 402 PAYMENT_DECLINED; the payment reads back FAILED; a retry may capture."""
    payments = await service("payments")
    body = {"orderId": 900001, "amount": {"amount": "12.50", "currency": "EUR"}, "method": "card-declined"}
    declined = await payments.post("/payments", json=body)
    assert error_of(declined) == (402, "PAYMENT_DECLINED")
    failed = (await payments.get("/payments", params={"orderIds": "900001"})).json()["data"]
    assert [p["status"] for p in failed] == ["FAILED"]
    captured = await payments.post("/payments", json={**body, "method": "card"})
    assert (captured.status_code, captured.json()["status"], captured.json()["amount"]["amount"]) == (201, "CAPTURED", "12.50")


async def test_one_live_payment_per_order_and_refund_once(service, error_of):
    """A second capture for an order is a 409; a refund is applied once however often it is asked."""
    payments = await service("payments")
    body = {"orderId": 900002, "amount": {"amount": "3", "currency": "EUR"}, "method": "card"}
    paid = (await payments.post("/payments", json=body)).json()
    assert error_of(await payments.post("/payments", json=body)) == (409, "PAYMENT_EXISTS")
    seq = (await payments.get("/events")).json()["latest"]
    refunds = [await payments.post(f"/payments/{paid['id']}/refund") for _ in range(2)]
    assert [(r.status_code, r.json()["status"]) for r in refunds] == [(200, "REFUNDED")] * 2
    events = (await payments.get("/events", params={"after": seq})).json()["events"]
    assert [e["type"] for e in events] == ["payment.refunded"]


async def test_same_payment_key_in_parallel_captures_once(service):
    """Five captures with one Idempotency-Key at once: one payment, five identical answers."""
    payments = await service("payments")
    body = {"orderId": 900003, "amount": {"amount": "3", "currency": "EUR"}, "method": "card"}
    answers = await asyncio.gather(*(payments.post("/payments", json=body, headers={"Idempotency-Key": "pay-1"})
                                     for _ in range(5)))
    assert {(r.status_code, r.text) for r in answers} == {(201, answers[0].text)}
    assert len((await payments.get("/payments", params={"orderIds": "900003"})).json()["data"]) == 1


async def test_shipment_created_then_cancelled(service, error_of):
    """A shipment is created PENDING, one per order; cancelling makes it CANCELLED and frees the order."""
    shipping = await service("shipping")
    body = {"orderId": 900004, "address": ADDRESS}
    created = await shipping.post("/shipments", json=body)
    assert (created.status_code, created.json()["status"]) == (201, "PENDING")
    assert error_of(await shipping.post("/shipments", json=body)) == (409, "SHIPMENT_EXISTS")
    cancelled = await shipping.post(f"/shipments/{created.json()['id']}/cancel")
    assert cancelled.json()["status"] == "CANCELLED"
    assert (await shipping.get(f"/shipments/{created.json()['id']}")).json()["status"] == "CANCELLED"
    assert (await shipping.post("/shipments", json=body)).status_code == 201


async def test_shipment_in_transit_cannot_be_cancelled(service, error_of):
    """A shipment that left (IN_TRANSIT in the demo data) answers 409 NOT_CANCELLABLE."""
    shipping = await service("shipping")
    moving = next(s for s in (await shipping.get("/shipments", params={"orderIds": ",".join(
        str(i) for i in range(4901, 5001))})).json()["data"] if s["status"] == "IN_TRANSIT")
    assert error_of(await shipping.post(f"/shipments/{moving['id']}/cancel")) == (409, "NOT_CANCELLABLE")
