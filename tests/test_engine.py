"""The planned engine: as few levels as the data's own dependencies, one call per service and
level, and documents that cannot hold the gateway."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx

from shop import Shop, gateway_client
from test_gateway import graphql, overlap, routes


async def test_a_customer_and_its_orders_page_are_read_in_the_same_level(gateway: httpx.AsyncClient,
                                                                          shop: Shop) -> None:
    """`customer(id) { orders }` asks customers and orders at the same time: the page needs only the id."""
    await shop.faults("customers", latencyMs=40)
    await shop.faults("orders", latencyMs=40)
    body = await graphql(gateway, '{ customer(id: 7) { name orders(first: 5) { totalCount nodes { id } } } }')
    customer = body["data"]["customer"]
    assert "errors" not in body and len(customer["orders"]["nodes"]) == 5
    calls = await shop.calls()
    (customers,), (orders,) = calls["customers"], calls["orders"]
    assert overlap(customers, orders)
    async with shop.client("orders") as client:
        direct = (await client.get("/orders?customerId=7&limit=5")).json()
    assert [n["id"] for n in customer["orders"]["nodes"]] == [str(o["id"]) for o in direct["data"]]
    assert customer["orders"]["totalCount"] == direct["totalCount"]


async def test_nested_customers_and_their_orders_cost_one_call_per_service_and_level(
    gateway: httpx.AsyncClient, shop: Shop
) -> None:
    """Orders → their customers → each customer's first page → those orders' customers and pages: one orders
    call per level (by ids, then one page per customer in one call), one customers call, whatever the count."""
    query = """query($ids: [ID!]!) { orders(ids: $ids) { id customer { name orders(first: 3) { nodes { id
      customer { name orders(first: 2) { totalCount nodes { id } } } } } } } }"""
    ids = ["11", "12", "13", "14", "15", "16", "17", "18"]
    body = await graphql(gateway, query, ids=ids)
    assert "errors" not in body, body["errors"]  # shown: it failed once, unexplained, in a full local run
    assert [o["id"] for o in body["data"]["orders"]] == ids
    customers = {o["customer"]["name"] for o in body["data"]["orders"]}
    assert len(customers) > 3
    calls = await shop.calls()
    assert routes(calls)["orders"] == ["/orders"] * 3 and routes(calls)["customers"] == ["/customers"]
    by_ids, first_pages, second_pages = sorted(calls["orders"], key=lambda c: c["start"])
    assert by_ids["ids"] == len(ids)
    assert first_pages["ids"] == second_pages["ids"] == len(customers)  # one page per customer, in one call
    assert calls["customers"][0]["ids"] == len(customers)  # the nested customers were read already


async def test_the_order_history_takes_two_levels(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """Customer and page, then books (their authors included), payments and shipments together: two levels, five calls."""
    for service in shop.apps:
        await shop.faults(service, latencyMs=30)
    query = """query($id: ID!) { customer(id: $id) { name orders(first: 20) { nodes { id items { book {
      title author { name } } } payment { status } shipment { status } } } } }"""
    body = await graphql(gateway, query, id="7")
    assert "errors" not in body
    calls = [c for reqs in (await shop.calls()).values() for c in reqs]
    assert len(calls) == 5
    levels: list[list[dict]] = []
    for call in sorted(calls, key=lambda c: c["start"]):
        if levels and all(overlap(call, other) for other in levels[-1]):
            levels[-1].append(call)
        else:
            levels.append([call])
    assert [sorted(c["route"] for c in level) for level in levels] == [
        ["/customers", "/orders"], ["/books", "/payments", "/shipments"]]
    assert all(overlap(a, b) for level in levels for a, b in itertools.combinations(level, 2))


class WithoutIncluded(httpx.AsyncBaseTransport):
    """The catalog as a service that does not know `include`: its answers carry no `included`."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = json.loads(await response.aread())
        if isinstance(body, dict):
            body.pop("included", None)
        return httpx.Response(response.status_code, headers={k: v for k, v in response.headers.items()
                                                             if k.lower() != "content-length"}, json=body)


async def test_authors_a_catalog_does_not_send_along_are_read_in_a_level_of_their_own(shop: Shop) -> None:
    """Books whose service ignores `include`: the same answer, the authors read after the books in one call of their own."""
    query = '{ books(ids: ["1", "2", "3"]) { title author { name } } }'
    async with gateway_client(shop) as client:
        expected = await graphql(client, query)
    await shop.reset_stats()
    async with gateway_client(shop, transports={"catalog": WithoutIncluded(shop.transports["catalog"])}) as client:
        body = await graphql(client, query)
    assert body["data"] == expected["data"] and "errors" not in body
    books, authors = sorted((await shop.calls())["catalog"], key=lambda c: c["start"])
    assert (books["route"], authors["route"]) == ("/books", "/authors") and authors["start"] >= books["end"]


def _fragment_bomb(levels: int, alias: bool) -> str:
    fragments = [f"fragment F{i} on Book {{ {'a: ' if alias else ''}title ...F{i + 1} ...F{i + 1} }}"
                 for i in range(levels)]
    return " ".join(["query Bomb { book(id: 1) { ...F0 } }", *fragments, f"fragment F{levels} on Book {{ title }}"])


async def test_a_fragment_bomb_is_refused_at_once_and_health_checks_answer_meanwhile(
    gateway: httpx.AsyncClient, shop: Shop
) -> None:
    """30 fragments each spreading the next twice (2^30 aliases once expanded) are refused by the alias
    limit in well under a second, with no upstream call, while /healthz answers."""
    bomb = _fragment_bomb(30, alias=True)
    assert len(bomb) < 1500
    started = time.monotonic()
    refused, health = await asyncio.gather(gateway.post("/graphql", json={"query": bomb}), gateway.get("/healthz"))
    assert time.monotonic() - started < 3.0  # expanding 2^30 fields would never finish
    assert health.status_code == 200
    error = refused.json()["errors"][0]
    assert refused.json()["data"] is None and error["extensions"]["code"] == "ALIAS_LIMIT_EXCEEDED"
    assert all(not reqs for reqs in (await shop.calls()).values())


async def test_a_fragment_bomb_within_the_limits_runs_each_fragment_once(gateway: httpx.AsyncClient,
                                                                         shop: Shop) -> None:
    """Without aliases the same bomb is a valid query: fragments merge once per selection set, one book call."""
    body = await graphql(gateway, _fragment_bomb(30, alias=False))
    assert "errors" not in body and list(body["data"]["book"]) == ["title"] and body["data"]["book"]["title"]
    assert routes(await shop.calls())["catalog"] == ["/books"]
