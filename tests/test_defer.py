"""@defer and @stream: the answer in parts over multipart/mixed (the deferSpec=20220824 format
Apollo Client and GraphiQL read), the initial part not waiting for what only deferred fields
need, a failing deferred part carrying its error at its path, @stream's first items."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from incremental import merged, parts
from shop import STAFF, Shop, as_customer, gateway_for, on_a_real_port, running_gateway

ACCEPT = "multipart/mixed;deferSpec=20220824, application/json"  # what Apollo Client 3 sends
ORDER_PAGE = """query($id: ID!) { order(id: $id) { id status customer { name }
  ... @defer(label: "later") { shipment { carrier trackingNumber } items { book { stock { available } } } } } }"""


@pytest.fixture(autouse=True)
def _nothing_fails_on_the_side(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """No error is logged meanwhile: not by the gateway nor asyncio (a future left behind),
    nor by uvicorn (an exception in the app; its own handler writes to stderr)."""
    yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Exception in ASGI application" not in capfd.readouterr().err


@contextlib.asynccontextmanager
async def gateway_url(shop: Shop) -> AsyncIterator[str]:
    """A gateway on a real port (httpx's ASGI transport would hand over the body only whole)."""
    async with running_gateway(shop, follow_feeds=False, learn_limits=False) as (_, app), on_a_real_port(app) as url:
        yield f"{url}/graphql"


async def answer(client: httpx.AsyncClient, query: str, variables: dict[str, Any] | None = None,
                 accept: str = ACCEPT) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """The response and its parts (one, the JSON body, when it is not multipart)."""
    async with client.stream("POST", "/graphql", json={"query": query, "variables": variables or {}},
                             headers={"accept": accept}) as response:
        if not response.headers["content-type"].startswith("multipart/mixed"):
            await response.aread()
            return response, [response.json()]
        return response, [p async for p in parts(response)]


async def test_the_first_part_arrives_while_the_slowed_shipping_call_is_still_in_flight(shop: Shop) -> None:
    """With shipping slowed by 500 ms, the initial part is received while the shipments call is in flight; the deferred part brings it."""
    await shop.faults("shipping", latencyMs=500)
    async with gateway_url(shop) as url, httpx.AsyncClient(timeout=30, headers=STAFF) as client:
        async with client.stream("POST", url, json={"query": ORDER_PAGE, "variables": {"id": "4850"}},
                                 headers={"accept": ACCEPT}) as response:
            received = []
            async for payload in parts(response):
                if not received:
                    shipping = [r for r in await shop.stats("shipping") if r["route"] == "/shipments"]
                    assert len(shipping) == 1 and shipping[0]["end"] is None  # still in flight
                received.append(payload)
    first, *rest = received
    assert first["hasNext"] is True and "errors" not in first
    assert set(first["data"]["order"]) == {"id", "status", "customer"}
    assert [p["hasNext"] for p in rest] == [False]
    (entry,) = rest[0]["incremental"]
    assert entry["path"] == ["order"] and entry["label"] == "later"
    assert entry["data"]["shipment"]["carrier"]
    assert entry["data"]["items"] and all("stock" in item["book"] for item in entry["data"]["items"])


async def test_a_failing_deferred_part_carries_its_error_at_its_path_and_the_initial_part_stands(shop: Shop) -> None:
    """With shipping down, the initial part is whole; the deferred part has shipment null with UPSTREAM_UNAVAILABLE at order.shipment, and says so in its extensions."""
    await shop.faults("shipping", errorRate=1.0, errorStatus=503)
    async with gateway_for(shop, retries=0) as client:
        _, (first, later) = await answer(client, ORDER_PAGE, {"id": "4850"})
    assert "errors" not in first and first["data"]["order"]["customer"]["name"]
    assert "complete" not in first.get("extensions", {})
    (entry,) = later["incremental"]
    assert entry["data"]["shipment"] is None and entry["data"]["items"]
    assert [(e["path"], e["extensions"]["code"], e["extensions"]["service"]) for e in entry["errors"]] == [
        (["order", "shipment"], "UPSTREAM_UNAVAILABLE", "shipping")]
    assert later["extensions"] == {"complete": False, "failedServices": ["shipping"]}
    assert later["hasNext"] is False


async def test_stream_sends_the_first_initial_count_items_then_the_rest(shop: Shop) -> None:
    """books(ids:) @stream(initialCount: 2): two books in the initial part, read on their own; the other three in the next, at books.2."""
    query = 'query($ids: [ID!]!) { books(ids: $ids) @stream(initialCount: 2, label: "more") { id title } }'
    ids = ["1", "2", "3", "4", "5"]
    async with gateway_for(shop) as gateway:
        _, payloads = await answer(gateway, query, {"ids": ids})
        assert sorted(r["ids"] for r in (await shop.calls())["catalog"]) == [2, 3]  # two reads: the first ids, the rest
        await shop.reset_stats()
        _, (whole,) = await answer(gateway, query.replace("initialCount: 2", "initialCount: 9"), {"ids": ids})
    first, *rest = payloads
    assert [b["id"] for b in first["data"]["books"]] == ["1", "2"] and first["hasNext"] is True
    assert [p["incremental"] for p in rest] == [[{"items": rest[0]["incremental"][0]["items"], "path": ["books", 2],
                                                  "label": "more"}]]
    assert [b["id"] for b in merged(payloads)["data"]["books"]] == ids
    assert [b["id"] for b in whole["data"]["books"]] == ids and whole["hasNext"] is False  # nothing left to stream


async def test_a_deferred_fragment_in_a_list_is_sent_at_each_item(gateway: httpx.AsyncClient) -> None:
    """A fragment deferred in order.items comes once per item, at order.items.<i>, all in one payload."""
    query = 'query($id: ID!) { order(id: $id) { id items { quantity ... @defer { book { title } } } } }'
    _, payloads = await answer(gateway, query, {"id": "4850"})
    first, later = payloads
    count = len(first["data"]["order"]["items"])
    assert [e["path"] for e in later["incremental"]] == [["order", "items", i] for i in range(count)]
    _, (plain,) = await answer(gateway, query.replace("@defer", ""), {"id": "4850"})
    assert merged(payloads)["data"] == plain["data"]


async def test_without_multipart_or_with_if_false_the_answer_is_one_json_body(gateway: httpx.AsyncClient) -> None:
    """A client that does not accept multipart/mixed, or @defer(if: false), gets the whole answer as plain JSON."""
    query = 'query($id: ID!, $d: Boolean!) { order(id: $id) { id ... @defer(if: $d) { customer { name } } } }'
    plain, (body,) = await answer(gateway, query, {"id": "4850", "d": True}, accept="application/json")
    assert plain.headers["content-type"].startswith("application/json")
    assert body["data"]["order"]["customer"]["name"] and "hasNext" not in body
    off, (body,) = await answer(gateway, query, {"id": "4850", "d": False})
    assert off.headers["content-type"].startswith("application/json")
    assert body["data"]["order"]["customer"]["name"]


async def test_the_reference_execution_ignores_defer(gateway: httpx.AsyncClient) -> None:
    """Introspection (graphql-core's execution) with @defer answers whole, in one JSON body."""
    response, (body,) = await answer(gateway, "{ __schema { ... @defer { queryType { name } } } }")
    assert response.headers["content-type"].startswith("application/json")
    assert body["data"] == {"__schema": {"queryType": {"name": "Query"}}} and "errors" not in body


async def test_the_first_part_carries_the_trace_id_and_the_consistency_token(gateway: httpx.AsyncClient) -> None:
    """The multipart answer has the trace id header and extensions.traceId on its first part, and the consistency token."""
    response, (first, *_) = await answer(gateway, ORDER_PAGE, {"id": "4850"})
    assert first["extensions"]["traceId"] == response.headers["x-trace-id"]
    assert response.headers.get("x-bookvault-consistency") or "set-cookie" in response.headers


async def test_a_client_that_leaves_stops_the_reads_only_later_parts_need(shop: Shop) -> None:
    """The client closes after the first part while /books is held: once it is let go, the deferred authors are never read."""
    await shop.faults("catalog", hang=True, paths=["/books"])
    query = 'query($id: ID!) { order(id: $id) { id ... @defer { items { book { author { name } } } } } }'
    async with gateway_url(shop) as url, httpx.AsyncClient(timeout=30, headers=STAFF) as client:
        async with client.stream("POST", url, json={"query": query, "variables": {"id": "4850"}},
                                 headers={"accept": ACCEPT}) as response:
            async for first in parts(response):
                assert first["data"]["order"]["id"] == "4850" and first["hasNext"] is True
                break  # and the connection is closed with the body unread
        async with shop.client("catalog") as catalog:
            (await catalog.delete("/_admin/faults")).raise_for_status()
        async with asyncio.timeout(10):
            while [r for r in await shop.stats("catalog") if r["route"] == "/books" and r["end"] is None]:
                await asyncio.sleep(0.01)  # the held call, answered now: the stats are what a test can watch
        # Another request through the gateway, with round trips of its own: the authors'
        # group would have been read by the time it is answered.
        later = await client.post(url, json={"query": '{ order(id: "4851") { items { book { title } } } }'})
        assert later.json()["data"]["order"]["items"]
    assert [r["route"] for r in await shop.stats("catalog") if r["route"] == "/authors"] == []


async def test_a_fragment_deferred_inside_another_comes_after_it_at_its_own_path(gateway: httpx.AsyncClient) -> None:
    """A nested @defer is sent after the fragment it is in, at the object it is spread on, with its label."""
    query = ('query($id: ID!) { order(id: $id) { id ... @defer(label: "outer") { customer { name '
             '... @defer(label: "inner") { email } } } } }')
    _, payloads = await answer(gateway, query, {"id": "4850"})
    assert [[(e["label"], e["path"]) for e in p.get("incremental", ())] for p in payloads] == [
        [], [("outer", ["order"])], [("inner", ["order", "customer"])]]
    assert [p["hasNext"] for p in payloads] == [True, True, False]
    customer = merged(payloads)["data"]["order"]["customer"]
    assert customer["name"] and "@" in customer["email"]


async def test_stale_entries_are_named_in_the_extensions_of_the_part_that_served_them(shop: Shop) -> None:
    """With the catalog failing past the books' TTL, the deferred books are served stale: the deferred payload's extensions say so, the first's do not."""
    now = [1_800_000_000.0]
    async with running_gateway(shop, wall_clock=lambda: now[0], cache_overrides={"book": (30.0, 600.0)}) as (client, _):
        await client.post("/graphql", json={"query": '{ books(ids: ["1", "2"]) { id title } }'})
        await shop.faults("catalog", errorRate=1.0, errorStatus=503, paths=["/books"])
        now[0] += 31
        _, (first, later) = await answer(client, '{ order(id: "4850") { id } ... @defer { books(ids: ["1", "2"]) { id title } } }')
    assert "stale" not in first.get("extensions", {}) and "errors" not in first
    assert later["extensions"] == {"stale": [{"path": ["books", i], "service": "catalog", "version": 1, "ageMs": 31_000}
                                             for i in (0, 1)]}
    assert [b["id"] for b in later["incremental"][0]["data"]["books"]] == ["1", "2"]


async def test_a_deferred_fragment_reveals_nothing_of_an_order_the_caller_may_not_see(shop: Shop) -> None:
    """Customer 8 deferring the shipment and items of customer 7's order: FORBIDDEN at `order`, no later part, only the orders service read."""
    async with shop.client("orders") as orders:
        o7 = (await orders.get("/orders", params={"customerId": 7, "limit": 1})).json()["data"][0]["id"]
    async with running_gateway(shop, headers=as_customer(8)) as (client, _):
        await shop.reset_stats()
        _, payloads = await answer(client, ORDER_PAGE, {"id": str(o7)})
    (only,) = payloads
    assert only["data"] == {"order": None} and only["hasNext"] is False
    assert [(e["path"], e["extensions"]["code"]) for e in only["errors"]] == [(["order"], "FORBIDDEN")]
    assert [name for name, calls in (await shop.calls()).items() if calls] == ["orders"]
