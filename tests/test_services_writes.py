"""Versioned writes: every change bumps the version by one and emits one event with it."""

from __future__ import annotations

import asyncio

import pytest

# service, entity path, a valid change, entity name in events, the id events name
PATCHES = [
    ("customers", "/customers/5", {"name": "Zed Okafor", "tier": "gold"}, "customer", 5),
    ("catalog", "/books/5", {"price": {"amount": "12.5", "currency": "EUR"}}, "book", 5),
    ("inventory", "/stock/5", {"available": 9}, "stock", 5),
    ("orders", "/orders/4994", {"status": "PAID"}, "order", 4994),  # 4994 is PLACED in the demo data
]


async def _latest_seq(client) -> int:
    return (await client.get("/events")).json()["latest"]


@pytest.mark.parametrize(("name", "path", "change", "entity", "entity_id"), PATCHES, ids=[p[1] for p in PATCHES])
async def test_patch_bumps_version_by_one_and_emits_one_event(service, name, path, change, entity, entity_id):
    """A PATCH answers version+1, a later GET agrees, and the feed gains one event naming it."""
    client = await service(name)
    before = (await client.get(path)).json()
    seq = await _latest_seq(client)

    patched = await client.patch(path, json=change)

    assert patched.status_code == 200
    assert patched.json()["version"] == before["version"] + 1
    assert (await client.get(path)).json() == patched.json()
    feed = (await client.get("/events", params={"after": seq})).json()
    assert [(e["type"], e["entity"], e["id"], e["version"]) for e in feed["events"]] == [
        (f"{entity}.updated", entity, entity_id, before["version"] + 1)
    ]
    assert feed["next"] == feed["latest"] == seq + 1
    assert feed["events"][0]["at"] == patched.json()["updatedAt"]


async def test_patch_changes_only_the_named_fields(catalog):
    """A PATCH of the price leaves the title alone, and the price reads back normalised."""
    before = (await catalog.get("/books/8")).json()
    after = (await catalog.patch("/books/8", json={"price": {"amount": "7.5", "currency": "USD"}})).json()
    assert after["price"] == {"amount": "7.50", "currency": "USD"}
    assert {k: v for k, v in after.items() if k not in ("price", "version", "updatedAt")} == {
        k: v for k, v in before.items() if k not in ("price", "version", "updatedAt")
    }
    assert after["updatedAt"] > before["updatedAt"]


async def test_twenty_concurrent_patches_end_at_version_21_with_distinct_events(catalog):
    """20 PATCHes of one book at once: each gets its own version, the book ends at 21."""
    seq = await _latest_seq(catalog)
    responses = await asyncio.gather(
        *(catalog.patch("/books/1", json={"title": f"Edition {n}"}) for n in range(20))
    )
    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 22))
    final = (await catalog.get("/books/1")).json()
    assert final["version"] == 21
    # The title that stuck is the one of the PATCH that got version 21.
    assert final["title"] == next(r.json()["title"] for r in responses if r.json()["version"] == 21)
    events = (await catalog.get("/events", params={"after": seq})).json()["events"]
    assert len(events) == 20
    assert sorted(e["version"] for e in events) == list(range(2, 22))
    assert {(e["entity"], e["id"]) for e in events} == {("book", 1)}
    # Feed order is commit order, so versions rise with seq.
    assert [e["version"] for e in events] == list(range(2, 22))


async def test_order_moves_forward_through_its_statuses(orders):
    """PLACED -> PAID -> SHIPPED -> DELIVERED: each step is a new version and an event."""
    seq = await _latest_seq(orders)
    for version, status in enumerate(("PAID", "SHIPPED", "DELIVERED"), start=2):
        response = await orders.patch("/orders/4994", json={"status": status})
        assert response.status_code == 200
        assert (response.json()["status"], response.json()["version"]) == (status, version)
    events = (await orders.get("/events", params={"after": seq})).json()["events"]
    assert [(e["type"], e["id"], e["version"]) for e in events] == [("order.updated", 4994, v) for v in (2, 3, 4)]


async def test_post_order_creates_version_1_with_location_and_event(orders):
    """POST /orders answers 201 with Location, the computed total, status PLACED, and one event."""
    seq = await _latest_seq(orders)
    body = {"customerId": 42, "items": [
        {"bookId": 3, "quantity": 2, "unitPrice": {"amount": "10.25", "currency": "EUR"}, "titleAtPurchase": "A"},
        {"bookId": 9, "quantity": 1, "unitPrice": {"amount": "5", "currency": "EUR"}, "titleAtPurchase": "B"},
    ]}
    response = await orders.post("/orders", json=body)
    assert response.status_code == 201
    order = response.json()
    assert (order["customerId"], order["status"], order["version"]) == (42, "PLACED", 1)
    assert order["total"] == {"amount": "25.50", "currency": "EUR"}
    assert order["items"] == body["items"]
    assert response.headers["etag"] == 'W/"1"'
    assert (await orders.get(response.headers["location"])).json() == order
    events = (await orders.get("/events", params={"after": seq})).json()["events"]
    assert [(e["type"], e["id"], e["version"]) for e in events] == [("order.created", order["id"], 1)]
