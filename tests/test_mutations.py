"""placeOrder and cancelOrder through the gateway: the orders service's checkout saga with the
other services in process, every outcome read back through each service's own API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import sqlite_urls
from mock_services import SERVICES, create_app
from saga_shop import ADDRESS, running_checkout_shop
from shop import STAFF, Shop, as_customer, running_gateway

REDIS = "redis://127.0.0.1:6379/0"
CALLER = as_customer(7)
GQL_ADDRESS = {"name": ADDRESS["name"], "street": ADDRESS["street"], "city": ADDRESS["city"],
               "postalCode": ADDRESS["postalCode"], "country": ADDRESS["country"]}
PLACE = """mutation($input: PlaceOrderInput!, $key: String!) {
  placeOrder(input: $input, idempotencyKey: $key) {
    checkoutId status reason order { id status total { amount } items { quantity book { id } } payment { status } }
  }
}"""
CANCEL = "mutation($id: ID!) { cancelOrder(id: $id) { id status payment { status } shipment { status } } }"
ORDER = "query($id: ID!) { order(id: $id) { status payment { status } shipment { status } } }"
HISTORY = "query($id: ID!) { customer(id: $id) { orders(first: 5) { totalCount nodes { id status } } } }"
STOCK = "query($ids: [ID!]!) { books(ids: $ids) { id stock { available } } }"


class Store:
    """The six services (orders calling the other four in process) and a gateway in front."""

    def __init__(self, shop: Shop, gateway: httpx.AsyncClient) -> None:
        self.shop, self.gateway = shop, gateway

    async def graphql(self, query: str, headers: dict[str, str] | None = None, **variables: Any) -> dict[str, Any]:
        response = await self.gateway.post("/graphql", json={"query": query, "variables": variables},
                                           headers=CALLER if headers is None else headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def place(self, lines: list[tuple[int, int]], key: str = "k-1", method: str = "card",
                    headers: dict[str, str] | None = None, **changes: Any) -> dict[str, Any]:
        order_input = {"items": [{"bookId": str(b), "quantity": q} for b, q in lines],
                       "shippingAddress": GQL_ADDRESS, "paymentMethod": method, **changes}
        return await self.graphql(PLACE, headers, input=order_input, key=key)

    async def read(self, service: str, path: str, **params: Any) -> Any:
        async with self.shop.client(service) as client:
            response = await client.get(path, params=params or None)
            assert response.status_code == 200, response.text
            return response.json()

    async def available(self, *books: int) -> list[int]:
        data = (await self.read("inventory", "/stock", bookIds=",".join(map(str, books))))["data"]
        by_id = {s["bookId"]: s["available"] for s in data}
        return [by_id[b] for b in books]

    async def set_stock(self, book: int, available: int) -> None:
        async with self.shop.client("inventory") as client:
            (await client.patch(f"/stock/{book}", json={"available": available})).raise_for_status()

    async def state(self, order_id: int | str) -> dict[str, Any]:
        """An order as each service holds it, read through its own API."""
        return {
            "order": (await self.read("orders", f"/orders/{order_id}"))["status"],
            "payments": sorted(p["status"] for p in (await self.read("payments", "/payments", orderIds=str(order_id)))["data"]),
            "shipments": sorted(s["status"] for s in (await self.read("shipping", "/shipments", orderIds=str(order_id)))["data"]),
        }

    async def writes(self) -> dict[str, list[str]]:
        """Every non-GET request the services received (their /_admin/stats)."""
        return {name: [f"{r['method']} {r['route']}" for r in await self.shop.stats(name) if r["method"] != "GET"]
                for name in self.shop.apps}


@contextlib.asynccontextmanager
async def running_store(data_dir: Path, **gateway_settings: Any) -> AsyncIterator[Store]:
    urls = sqlite_urls(data_dir)
    async with running_checkout_shop(urls) as checkout:
        customers = create_app(SERVICES["customers"], database=urls["customers"], admin=True)
        async with customers.router.lifespan_context(customers):
            shop = Shop({**checkout.apps, "customers": customers})
            async with running_gateway(shop, headers={}, **gateway_settings) as (client, _):
                yield Store(shop, client)


@pytest.fixture
async def store(data_dir: Path) -> AsyncIterator[Store]:
    async with running_store(data_dir, follow_feeds=False) as store:
        yield store


async def test_place_order_pays_reserves_and_ships(store: Store) -> None:
    """placeOrder answers the order PAID; orders, inventory, payments and shipping agree through their own APIs."""
    await store.set_stock(11, 5)
    await store.set_stock(12, 5)
    body = await store.place([(11, 2), (12, 1)])
    assert "errors" not in body, body
    result = body["data"]["placeOrder"]
    order = result["order"]
    assert (result["status"], result["reason"], order["status"]) == ("PAID", None, "PAID")
    assert [(i["book"]["id"], i["quantity"]) for i in order["items"]] == [("11", 2), ("12", 1)]
    assert order["payment"] == {"status": "CAPTURED"}
    assert await store.state(order["id"]) == {"order": "PAID", "payments": ["CAPTURED"], "shipments": ["PENDING"]}
    assert (await store.read("orders", f"/orders/{order['id']}"))["customerId"] == 7
    assert await store.available(11, 12) == [3, 4]
    checkout = await store.read("orders", f"/checkouts/{result['checkoutId']}")
    assert (checkout["status"], checkout["orderId"]) == ("COMPLETED", int(order["id"]))


async def test_declined_payment_is_cancelled_with_payment_declined(store: Store) -> None:
    """A declined card: PAYMENT_DECLINED at placeOrder, naming the CANCELLED order; stock given back."""
    await store.set_stock(11, 5)
    body = await store.place([(11, 2)], method="card-declined")
    assert body["data"] == {"placeOrder": None}
    (error,) = body["errors"]
    assert error["path"] == ["placeOrder"]
    ext = error["extensions"]
    assert (ext["code"], ext["service"], ext["orderStatus"], ext["reason"]) == (
        "PAYMENT_DECLINED", "payments", "CANCELLED", "PAYMENT_DECLINED")
    assert await store.state(ext["orderId"]) == {"order": "CANCELLED", "payments": ["FAILED"], "shipments": []}
    assert await store.available(11) == [5]
    seen = await store.graphql(ORDER, id=ext["orderId"])
    assert seen["data"]["order"]["status"] == "CANCELLED"


async def test_out_of_stock_is_refused_and_moves_no_stock(store: Store) -> None:
    """One book short: OUT_OF_STOCK, the order CANCELLED, nothing charged, stock figures unchanged."""
    await store.set_stock(11, 5)
    await store.set_stock(12, 1)
    body = await store.place([(11, 1), (12, 2)])
    (error,) = body["errors"]
    assert (body["data"], error["path"], error["extensions"]["code"]) == ({"placeOrder": None}, ["placeOrder"],
                                                                         "OUT_OF_STOCK")
    assert await store.state(error["extensions"]["orderId"]) == {"order": "CANCELLED", "payments": [], "shipments": []}
    assert await store.available(11, 12) == [5, 1]


async def test_same_key_in_sequence_and_in_parallel_orders_once(store: Store) -> None:
    """One idempotency key sent five times at once and twice more after: one order, one capture, one answer."""
    await store.set_stock(11, 10)
    before = (await store.read("orders", "/orders", customerId="7"))["totalCount"]
    parallel = await asyncio.gather(*(store.place([(11, 2)], key="twice") for _ in range(5)))
    after = [await store.place([(11, 2)], key="twice") for _ in range(2)]
    answers = [body["data"]["placeOrder"] for body in parallel + after]
    assert all(a == answers[0] for a in answers), answers
    assert answers[0]["status"] == "PAID"
    assert (await store.read("orders", "/orders", customerId="7"))["totalCount"] == before + 1
    assert await store.available(11) == [8]
    assert (await store.state(answers[0]["order"]["id"]))["payments"] == ["CAPTURED"]
    assert [w for w in (await store.writes())["payments"] if w == "POST /payments"] == ["POST /payments"]


async def test_same_key_for_another_order_is_refused(store: Store) -> None:
    """A key reused for a different order is BAD_USER_INPUT and orders nothing more."""
    await store.set_stock(11, 10)
    assert "errors" not in await store.place([(11, 1)], key="cart")
    again = await store.place([(11, 3)], key="cart")
    assert (again["data"], again["errors"][0]["extensions"]["code"]) == ({"placeOrder": None}, "BAD_USER_INPUT")
    assert "idempotencyKey" in again["errors"][0]["message"]
    assert await store.available(11) == [9]


async def test_two_customers_with_one_key_get_two_orders(store: Store) -> None:
    """The key is the caller's own: customers 7 and 8 both using "k-1" get an order each."""
    await store.set_stock(11, 10)
    first = await store.place([(11, 1)], key="k-1")
    second = await store.place([(11, 1)], key="k-1", headers=as_customer(8))
    orders = [b["data"]["placeOrder"]["order"]["id"] for b in (first, second)]
    assert len(set(orders)) == 2
    assert [(await store.read("orders", f"/orders/{o}"))["customerId"] for o in orders] == [7, 8]


@pytest.mark.parametrize(("case", "changes"), [
    ("unknown book", {"items": [{"bookId": "999999", "quantity": 1}]}),
    ("quantity 0", {"items": [{"bookId": "11", "quantity": 0}]}),
    ("negative quantity", {"items": [{"bookId": "11", "quantity": -3}]}),
    ("1,000 items", {"items": [{"bookId": str(n % 50 + 1), "quantity": 1} for n in range(1000)]}),
    ("empty item list", {"items": []}),
    ("blank address", {"shippingAddress": {**GQL_ADDRESS, "street": "  "}}),
    ("bad country", {"shippingAddress": {**GQL_ADDRESS, "country": "Netherlands"}}),
    ("bad payment method", {"paymentMethod": "Card!"}),
    ("unknown customer", {"customerId": "999999"}),
    ("not an id", {"items": [{"bookId": "eleven", "quantity": 1}]}),
])
async def test_bad_input_is_refused_before_any_write(store: Store, case: str, changes: dict[str, Any]) -> None:
    """Bad input answers BAD_USER_INPUT at placeOrder and no service receives a single write."""
    headers = STAFF if "customerId" in changes else CALLER  # staff may name any customer
    body = await store.place([(11, 1)], headers=headers, **changes)
    (error,) = body["errors"]
    assert (body["data"], error["path"], error["extensions"]["code"]) == (
        {"placeOrder": None}, ["placeOrder"], "BAD_USER_INPUT"), case
    assert await store.writes() == {name: [] for name in store.shop.apps}


async def test_missing_address_or_customer_is_refused_before_any_write(store: Store) -> None:
    """No shippingAddress is a request error; an anonymous caller is UNAUTHENTICATED, staff naming no customer
    BAD_USER_INPUT, a customer naming another FORBIDDEN; nothing written."""
    order_input = {"items": [{"bookId": "11", "quantity": 1}], "paymentMethod": "card"}
    missing = await store.graphql(PLACE, input=order_input, key="k")
    assert missing["data"] is None and "shippingAddress" in missing["errors"][0]["message"]
    anonymous = await store.place([(11, 1)], headers={})
    assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    nobody = await store.place([(11, 1)], headers=STAFF)
    assert nobody["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    other = await store.place([(11, 1)], customerId="8")
    assert other["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    too_long = await store.place([(11, 1)], key="k" * 256)
    assert too_long["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert await store.writes() == {name: [] for name in store.shop.apps}


async def test_mutation_over_get_is_refused(store: Store) -> None:
    """A mutation sent with GET is a 405 and reaches no service."""
    response = await store.gateway.get("/graphql", params={"query": CANCEL, "variables": '{"id": "4901"}'},
                                       headers=CALLER)
    assert response.status_code == 405
    assert await store.writes() == {name: [] for name in store.shop.apps}
    assert all(calls == [] for calls in (await store.shop.calls()).values())


async def test_place_order_is_read_at_once_through_the_same_gateway(store: Store) -> None:
    """Feeds off, stock cached: right after placeOrder the customer's orders and the books' stock show it."""
    await store.set_stock(11, 5)
    warm = await store.graphql(STOCK, ids=["11"])
    assert warm["data"]["books"][0]["stock"]["available"] == 5
    history = (await store.graphql(HISTORY, id="7"))["data"]["customer"]["orders"]
    order_id = (await store.place([(11, 2)]))["data"]["placeOrder"]["order"]["id"]
    now = (await store.graphql(HISTORY, id="7"))["data"]["customer"]["orders"]
    assert now["totalCount"] == history["totalCount"] + 1
    assert now["nodes"][0] == {"id": order_id, "status": "PAID"}
    assert (await store.graphql(STOCK, ids=["11"]))["data"]["books"][0]["stock"]["available"] == 3


async def test_cancel_order_refunds_restocks_and_is_read_at_once(store: Store) -> None:
    """cancelOrder on a PAID order: CANCELLED, refunded, shipment cancelled, stock back; cached reads show it at once."""
    await store.set_stock(11, 5)
    order_id = (await store.place([(11, 2)]))["data"]["placeOrder"]["order"]["id"]
    cached = await store.graphql(ORDER, id=order_id)
    assert cached["data"]["order"] == {"status": "PAID", "payment": {"status": "CAPTURED"}, "shipment": {"status": "PENDING"}}
    assert (await store.graphql(STOCK, ids=["11"]))["data"]["books"][0]["stock"]["available"] == 3
    body = await store.graphql(CANCEL, id=order_id)
    assert "errors" not in body, body
    cancelled = {"status": "CANCELLED", "payment": {"status": "REFUNDED"}, "shipment": {"status": "CANCELLED"}}
    assert body["data"]["cancelOrder"] == {"id": order_id, **cancelled}
    assert await store.state(order_id) == {"order": "CANCELLED", "payments": ["REFUNDED"], "shipments": ["CANCELLED"]}
    assert await store.available(11) == [5]
    assert (await store.graphql(ORDER, id=order_id))["data"]["order"] == cancelled
    assert (await store.graphql(STOCK, ids=["11"]))["data"]["books"][0]["stock"]["available"] == 5


async def test_cancel_order_errors(store: Store) -> None:
    """Unknown order: NOT_FOUND; another customer's: FORBIDDEN; a SHIPPED one: NOT_CANCELLABLE; nothing written."""
    demo = (await store.read("orders", "/orders", customerId="7", limit="100"))["data"]
    shipped = next(o for o in demo if o["status"] == "SHIPPED")
    someone_else = as_customer(8)
    unknown = await store.graphql(CANCEL, id="999999")
    theirs = await store.graphql(CANCEL, someone_else, id=str(shipped["id"]))
    assert [b["errors"][0]["extensions"]["code"] for b in (unknown, theirs)] == ["NOT_FOUND", "FORBIDDEN"]
    assert await store.writes() == {name: [] for name in store.shop.apps}
    refused = await store.graphql(CANCEL, id=str(shipped["id"]))
    assert (refused["data"], refused["errors"][0]["extensions"]) == (
        {"cancelOrder": None}, {"code": "NOT_CANCELLABLE", "service": "orders"})
    assert (await store.read("orders", f"/orders/{shipped['id']}"))["status"] == "SHIPPED"


async def test_slow_checkout_answers_pending_within_the_deadline_then_paid(store: Store) -> None:
    """Shipping slow: placeOrder answers PENDING inside the caller's 1 s deadline; the same key later answers PAID."""
    await store.set_stock(11, 5)
    await store.shop.faults("shipping", latencyMs=1500, paths=["/shipments"])
    pending = await store.place([(11, 1)], key="slow", headers={**CALLER, "X-Request-Deadline-Ms": "1000"})
    assert "errors" not in pending, pending
    result = pending["data"]["placeOrder"]
    assert (result["status"], result["order"]["status"]) == ("PENDING", "PENDING")
    settled = (await store.place([(11, 1)], key="slow"))["data"]["placeOrder"]
    assert (settled["checkoutId"], settled["status"], settled["order"]["status"]) == (result["checkoutId"], "PAID", "PAID")
    assert await store.state(settled["order"]["id"]) == {"order": "PAID", "payments": ["CAPTURED"], "shipments": ["PENDING"]}




async def test_place_order_evicts_the_shared_redis_cache_too(data_dir: Path, namespace: str) -> None:
    """Stock cached in Redis before placeOrder: a gateway started afterwards on that Redis reads the new figure."""
    settings = {"follow_feeds": False, "redis_url": REDIS, "cache_namespace": namespace}
    async with running_store(data_dir, **settings) as store:
        await store.set_stock(11, 5)
        assert (await store.graphql(STOCK, ids=["11"]))["data"]["books"][0]["stock"]["available"] == 5
        assert "errors" not in await store.place([(11, 2)])
        async with running_gateway(store.shop, **settings) as (fresh, _):
            response = await fresh.post("/graphql", json={"query": STOCK, "variables": {"ids": ["11"]}})
    assert response.json()["data"]["books"][0]["stock"]["available"] == 3


async def test_a_lost_answer_is_a_timeout_and_the_same_key_then_answers_once(store: Store) -> None:
    """Orders too slow for the deadline: UPSTREAM_TIMEOUT, no retry; the same key again: PAID, one capture."""
    await store.set_stock(11, 5)
    await store.shop.faults("orders", latencyMs=1500, paths=["/checkouts"])
    lost = await store.place([(11, 1)], key="lost", headers={**CALLER, "X-Request-Deadline-Ms": "500"})
    assert (lost["data"], lost["errors"][0]["extensions"]["code"]) == ({"placeOrder": None}, "UPSTREAM_TIMEOUT")
    assert [w for w in (await store.writes())["orders"] if w == "POST /checkouts"] == ["POST /checkouts"]
    await store.shop.faults("orders")
    again = (await store.place([(11, 1)], key="lost"))["data"]["placeOrder"]
    assert again["status"] == "PAID"
    assert (await store.state(again["order"]["id"]))["payments"] == ["CAPTURED"]
    assert await store.available(11) == [4]
