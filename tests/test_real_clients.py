"""Real clients against a gateway on a real port, from the npm registry at the versions
tests/js/package-lock.json pins: Apollo Client's automatic persisted queries
(createPersistedQueryLink over HttpLink), Apollo Client reading a deferred query's parts, the
graphql-http audit suite (GraphQL over HTTP conformance), and the client matrix at each client's
defaults (tests/js/clients.mjs): urql, graphql-request, Apollo Client's multipart subscriptions
and GraphQLWsLink, graphql-ws, graphql-sse, graphql-js introspection and a Relay network layer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from shop import STAFF, Shop, on_a_real_port, running_gateway

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def node() -> str:
    """node, with tests/js's locked packages installed (`.ci/run` runs `npm ci`; a checkout without them gets it here)."""
    found = shutil.which("node")
    assert found, "node 20 and npm are needed: .ci/run installs them (apt-get install nodejs npm)"
    if not (JS / "node_modules" / "@apollo" / "client").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
    return found


NODE_TIMEOUT = 60  # seconds a script may take: each needs one or two round trips, and Node's start


@contextlib.asynccontextmanager
async def node_process(node: str, script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`node script args` in tests/js with a staff token in BOOKVAULT_TOKEN; killed if still running after."""
    token = STAFF["authorization"].removeprefix("Bearer ")
    process = await asyncio.create_subprocess_exec(node, script, *args, cwd=JS, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE,
                                                   env={**os.environ, "BOOKVAULT_TOKEN": token})
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def finish(process: asyncio.subprocess.Process) -> Any:
    """The last JSON line the script prints, once it exited 0 (within NODE_TIMEOUT)."""
    try:
        out, err = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
    except TimeoutError:
        process.kill()
        raise
    assert process.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def run_node(node: str, script: str, *args: str) -> Any:
    async with node_process(node, script, *args) as process:
        return await finish(process)


async def test_apollo_client_persisted_queries_register_then_run_by_hash(node: str, shop: Shop) -> None:
    """Apollo Client sends the hash alone, gets PERSISTED_QUERY_NOT_FOUND, retries with the query; the next time the hash alone is answered."""
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url:
        out = await run_node(node, "apollo_apq.mjs", f"{url}/graphql")
    wire = [(w["method"], w["sha256Hash"] is not None, w["withQuery"], w["status"], w["codes"]) for w in out["wire"]]
    assert wire == [
        ("POST", True, False, 200, ["PERSISTED_QUERY_NOT_FOUND"]),  # hash only: not found
        ("POST", True, True, 200, []),  # hash + query: registered and answered
        ("POST", True, False, 200, []),  # the second query: hash only, answered
    ]
    assert len({w["sha256Hash"] for w in out["wire"]}) == 1  # one document, one hash
    async with shop.client("orders") as client:
        order = (await client.get("/orders/4850")).json()
    async with shop.client("customers") as client:
        customer = (await client.get(f"/customers/{order['customerId']}")).json()
    expected = {"__typename": "Order", "id": "4850", "status": order["status"],
                "customer": {"__typename": "Customer", "name": customer["name"]}}
    assert out["wire"][1]["data"] == out["wire"][2]["data"] == {"order": expected}
    assert [r["error"] for r in out["results"]] == [None, None]
    assert all(r["data"]["order"]["customer"]["name"] == customer["name"] for r in out["results"])


async def test_the_graphql_http_audit_suite_passes_every_audit(node: str, shop: Shop) -> None:
    """Every graphql-http server audit is ok: requirements, recommendations and notices alike."""
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url:
        results = await run_node(node, "audit.mjs", f"{url}/graphql")
    failing = [f"{r['status']}: {r['name']} ({r['reason']})" for r in results if r["status"] != "ok"]
    assert len(results) > 30
    assert failing == []


async def test_apollo_client_reads_a_deferred_order_page_in_parts(node: str, shop: Shop) -> None:
    """Apollo Client (deferSpec=20220824) gets the multipart answer: first the order without the deferred fields, then all of it, as the gateway answers in one JSON body."""
    query = ("query($id: ID!) { order(id: $id) { id status customer { id name } shipment { id carrier trackingNumber }"
             " items { quantity book { id title stock { available } } } } }")
    async with running_gateway(shop) as (client, app), on_a_real_port(app) as url:
        out = await run_node(node, "apollo_defer.mjs", f"{url}/graphql", "4850")
        whole = (await client.post("/graphql", json={"query": query, "variables": {"id": "4850"}})).json()
    assert [w["accept"].split(",")[0] for w in out["wire"]] == ["multipart/mixed;deferSpec=20220824"]
    assert out["wire"][0]["contentType"].startswith('multipart/mixed; boundary="-"')
    assert out["emitted"][0]["dataState"] == "empty" and out["emitted"][0]["loading"] is True
    first, *_, last = out["emitted"][1:]
    assert first["dataState"] == "streaming" and "shipment" not in first["data"]["order"]
    assert first["data"]["order"]["customer"]["name"] == whole["data"]["order"]["customer"]["name"]
    assert last["dataState"] == "complete" and last["error"] is None
    assert _untyped(last["data"]) == whole["data"]


def _untyped(value: Any) -> Any:
    """`value` without the __typename fields Apollo Client adds to every selection."""
    if isinstance(value, dict):
        return {k: _untyped(v) for k, v in value.items() if k != "__typename"}
    if isinstance(value, list):
        return [_untyped(v) for v in value]
    return value


async def catalog_book(shop: Shop, book: int) -> dict[str, Any]:
    """What the catalog service says of `book`, shaped as `book { title author { name } }` answers."""
    async with shop.client("catalog") as client:
        raw = (await client.get(f"/books/{book}")).json()
        author = (await client.get(f"/authors/{raw['authorId']}")).json()
    return {"title": raw["title"], "author": {"name": author["name"]}}


async def query_with(node: str, shop: Shop, case: str) -> Any:
    """`clients.mjs case` against a gateway over `shop` on a real port."""
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url:
        return await run_node(node, "clients.mjs", case, f"{url}/graphql")


async def placed_order(shop: Shop) -> dict[str, Any]:
    """The first PLACED order of the seeded data, with its customer's name."""
    async with shop.client("orders") as client:
        for start in range(1, 5000, 100):
            page = (await client.get("/orders", params={"ids": ",".join(map(str, range(start, start + 100)))})).json()
            placed = [o for o in page["data"] if o["status"] == "PLACED"]
            if placed:
                order = placed[0]
                break
        else:
            raise AssertionError("no PLACED order in the seeded data")
    async with shop.client("customers") as client:
        order["customerName"] = (await client.get(f"/customers/{order['customerId']}")).json()["name"]
    return order


async def subscribe_with(node: str, shop: Shop, case: str) -> tuple[dict[str, Any], Any, int]:
    """`clients.mjs case` subscribed to orderUpdated of a PLACED order: the order, the script's
    output (its first two messages), and the version of the order the test then marked PAID."""
    order = await placed_order(shop)
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url, \
            node_process(node, "clients.mjs", case, f"{url}/graphql", str(order["id"])) as process:
        assert process.stdout is not None and process.stderr is not None
        line = await asyncio.wait_for(process.stdout.readline(), NODE_TIMEOUT)
        if not line:  # exited before the first message
            await asyncio.wait_for(process.wait(), NODE_TIMEOUT)
            raise AssertionError((await process.stderr.read()).decode()[-2000:])
        assert "first" in json.loads(line), line
        async with shop.client("orders") as client:
            answer = await client.patch(f"/orders/{order['id']}", json={"status": "PAID"})
            answer.raise_for_status()
        return order, await finish(process), int(answer.json()["version"])


def assert_order_then_paid(order: dict[str, Any], messages: list[dict[str, Any]], version: int) -> None:
    """The first message is the order as the services have it, the second the PAID order at `version`."""
    now = {"id": str(order["id"]), "status": "PLACED", "version": order["version"],
           "customer": {"name": order["customerName"]}}
    assert [_untyped(m["data"]) for m in messages] == [
        {"orderUpdated": now},
        {"orderUpdated": {**now, "status": "PAID", "version": version}},
    ]
    assert version == order["version"] + 1
    assert all(not m.get("errors") and not m.get("error") for m in messages)


async def test_urql_with_its_default_exchanges_reads_a_book(node: str, shop: Shop) -> None:
    """urql's Client (cacheExchange, fetchExchange, GET within the URL limit) gets the book the catalog has."""
    out = await query_with(node, shop, "urql")
    [message] = out["messages"]
    assert message["data"]["book"]["__typename"] == "Book"  # the document cache adds it
    assert (_untyped(message["data"]), message["error"]) == ({"book": await catalog_book(shop, 1)}, None)
    assert [(w["method"], w["status"]) for w in out["wire"]] == [("GET", 200)]
    assert out["wire"][0]["contentType"].startswith("application/graphql-response+json")


async def test_graphql_request_reads_books_with_request_and_graphql_client(node: str, shop: Shop) -> None:
    """graphql-request's request() and GraphQLClient.request() both get the catalog's books."""
    out = await query_with(node, shop, "graphql-request")
    assert out["messages"] == [{"data": {"book": await catalog_book(shop, 1)}},
                               {"data": {"book": await catalog_book(shop, 2)}}]
    assert [(w["method"], w["status"]) for w in out["wire"]] == [("POST", 200), ("POST", 200)]


async def test_apollo_client_follows_an_order_over_multipart_http(node: str, shop: Shop) -> None:
    """Apollo Client's HttpLink subscription (multipart subscriptionSpec 1.0) gets the order, then its PAID status."""
    order, out, version = await subscribe_with(node, shop, "apollo-multipart-subscription")
    assert_order_then_paid(order, out["messages"], version)
    [wire] = out["wire"]
    assert wire["accept"].startswith("multipart/mixed;boundary=graphql;subscriptionSpec=1.0")
    assert (wire["method"], wire["status"]) == ("POST", 200)
    assert wire["contentType"].startswith("multipart/mixed") and "subscriptionSpec" in wire["contentType"]


async def test_apollo_graphql_ws_link_follows_an_order(node: str, shop: Shop) -> None:
    """Apollo Client's GraphQLWsLink (graphql-ws over ws) gets the order, then its PAID status."""
    order, out, version = await subscribe_with(node, shop, "apollo-ws-subscription")
    assert_order_then_paid(order, out["messages"], version)


async def test_apollo_graphql_ws_link_reads_a_book(node: str, shop: Shop) -> None:
    """A query over Apollo Client's GraphQLWsLink gets the book the catalog has."""
    out = await query_with(node, shop, "apollo-ws-query")
    assert [(_untyped(m["data"]), m["error"]) for m in out["messages"]] == [
        ({"book": await catalog_book(shop, 1)}, None)]


async def test_graphql_ws_follows_an_order(node: str, shop: Shop) -> None:
    """graphql-ws's createClient (ws as its WebSocket) gets the order, then its PAID status."""
    order, out, version = await subscribe_with(node, shop, "graphql-ws-subscription")
    assert_order_then_paid(order, out["messages"], version)


async def test_graphql_ws_reads_a_book(node: str, shop: Shop) -> None:
    """A query over graphql-ws gets one result, the book the catalog has, then completes."""
    out = await query_with(node, shop, "graphql-ws-query")
    assert [(m["data"], m.get("errors")) for m in out["messages"]] == [({"book": await catalog_book(shop, 1)}, None)]


async def test_graphql_sse_follows_an_order_in_distinct_connections_mode(node: str, shop: Shop) -> None:
    """graphql-sse's createClient (distinct connections, its default) gets the order, then its PAID status."""
    order, out, version = await subscribe_with(node, shop, "graphql-sse-subscription")
    assert_order_then_paid(order, out["messages"], version)
    assert [(w["method"], w["status"], w["contentType"].split(";")[0]) for w in out["wire"]] == [
        ("POST", 200, "text/event-stream")]


async def test_graphql_sse_reads_a_book(node: str, shop: Shop) -> None:
    """A query over graphql-sse gets one result, the book the catalog has, then completes."""
    out = await query_with(node, shop, "graphql-sse-query")
    assert [(m["data"], m.get("errors")) for m in out["messages"]] == [({"book": await catalog_book(shop, 1)}, None)]
    assert [w["contentType"].split(";")[0] for w in out["wire"]] == ["text/event-stream"]


async def test_graphql_js_builds_the_schema_from_a_full_introspection(node: str, shop: Shop) -> None:
    """getIntrospectionQuery with every option (oneOf too) answers what buildClientSchema and printSchema take."""
    [out] = (await query_with(node, shop, "introspection"))["messages"]
    assert out["errors"] is None
    assert (out["bookType"], out["bookArgs"]) == ("Book", ["id: ID!"])
    assert {"orderUpdated", "myOrdersUpdated"} <= set(out["subscriptionFields"])
    assert out["sdlLength"] > 1000


async def test_a_relay_network_layer_reads_a_book(node: str, shop: Shop) -> None:
    """Relay's fetchQuery over Network.create with the fetch function of Relay's docs reads the catalog's book."""
    out = await query_with(node, shop, "relay")
    assert out["messages"] == [{"data": {"book": await catalog_book(shop, 1)}}]
    # No Accept of its own: fetch sends `Accept: */*`.
    assert [(w["method"], w["accept"], w["status"]) for w in out["wire"]] == [("POST", None, 200)]
