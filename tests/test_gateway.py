"""The gateway composes the six services: batching, fan-out, errors at paths, HTTP."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest

from schema import SDL_PATH, sdl
from shop import Shop, as_customer, running_gateway, running_shop

ORDER_PAGE = (SDL_PATH.parent / "examples" / "order_page.graphql").read_text()
ORDER_HISTORY = """query($id: ID!) { customer(id: $id) { name orders(first: 20) { totalCount
  nodes { id items { quantity book { title author { name } } } payment { status } shipment { status } } } } }"""
ORDER_ID = "4850"  # shipped and paid: every service has something to say about it


async def graphql(client: httpx.AsyncClient, query: str, **variables: Any) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, "variables": variables})
    assert response.status_code == 200, response.text
    return response.json()


def routes(calls: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    return {name: sorted(c["route"] for c in reqs) for name, reqs in calls.items()}


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


async def test_order_page_calls_each_service_once(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """The order page makes one call to each service: the catalog sends the books' authors with the books."""
    body = await graphql(gateway, ORDER_PAGE, id=ORDER_ID)
    assert "errors" not in body
    assert routes(await shop.calls()) == {
        "customers": ["/customers"],
        "catalog": ["/books"],
        "inventory": ["/stock"],
        "orders": ["/orders"],
        "payments": ["/payments"],
        "shipping": ["/shipments"],
    }


async def test_order_history_calls_each_service_once_per_level(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """Twenty orders with their books, authors, payments and shipments still cost one call per service and level."""
    body = await graphql(gateway, ORDER_HISTORY, id="7")
    nodes = body["data"]["customer"]["orders"]["nodes"]
    assert len(nodes) == 20 and "errors" not in body
    calls = await shop.calls()
    assert routes(calls) == {
        "customers": ["/customers"],
        "catalog": ["/books"],
        "inventory": [],
        "orders": ["/orders"],
        "payments": ["/payments"],
        "shipping": ["/shipments"],
    }
    distinct_books = {item["book"]["title"] for n in nodes for item in n["items"]}
    books_call = next(c for c in calls["catalog"] if c["route"] == "/books")
    assert books_call["ids"] >= len(distinct_books) > 20  # one call, de-duplicated ids, many books
    assert next(c for c in calls["payments"])["ids"] == 20


async def test_duplicate_ids_are_merged(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """The same book asked for three times in one query is fetched once."""
    body = await graphql(gateway, '{ a: book(id: 5) { title } b: book(id: 5) { isbn } books(ids: ["5", "6", "5"]) { id } }')
    assert [b["id"] for b in body["data"]["books"]] == ["5", "6", "5"]
    (call,) = (await shop.calls())["catalog"]
    assert call["ids"] == 2


async def test_many_books_are_chunked_and_sent_concurrently(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """250 distinct books go out as ceil(250 / maxBatch) calls that overlap in time."""
    await shop.faults("catalog", latencyMs=30, paths=["/books"])
    ids = [str(i) for i in range(1, 251)]
    body = await graphql(gateway, "query($ids: [ID!]!) { books(ids: $ids) { id title } }", ids=ids)
    assert [b["id"] for b in body["data"]["books"]] == ids
    calls = (await shop.calls())["catalog"]
    assert sorted(c["ids"] for c in calls) == [50, 100, 100]
    assert all(overlap(a, b) for a, b in itertools.combinations(calls, 2))


async def test_chunks_follow_the_limit_a_service_advertises(seeded_dir: Path, tmp_path: Path) -> None:
    """A catalog that allows 40 ids per call (GET /_meta) gets 100 books in chunks of 40, though 100 is configured."""
    async with running_shop(seeded_dir, tmp_path, max_batch=40) as small, running_gateway(small) as (client, app):
        await asyncio.wait_for(app.state.gateway.limits, 10)
        ids = [str(i) for i in range(1, 101)]
        body = await graphql(client, "query($ids: [ID!]!) { books(ids: $ids) { id } }", ids=ids)
        assert [b["id"] for b in body["data"]["books"]] == ids and "errors" not in body
        assert sorted(c["ids"] for c in (await small.calls())["catalog"]) == [20, 40, 40]


async def test_fan_out_reads_each_level_at_once(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """The order page reads the order; then, at once, its payment and shipment (read only from an order the
    caller may see: ARCHITECTURE.md, "Callers"), the customer, the books with their authors, and their stock."""
    for service in shop.apps:
        await shop.faults(service, latencyMs=30)
    await graphql(gateway, ORDER_PAGE, id=ORDER_ID)
    calls = await shop.calls()
    by_route = {c["route"]: c for reqs in calls.values() for c in reqs}
    assert sum(len(reqs) for reqs in calls.values()) == len(by_route) == 6
    second = [by_route[r] for r in ("/payments", "/shipments", "/customers", "/books", "/stock")]
    assert all(overlap(a, b) for a, b in itertools.combinations(second, 2))
    assert all(c["start"] >= by_route["/orders"]["end"] for c in second)  # they need the order's data


async def test_fields_equal_what_the_services_return(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """Every field of the order page is what the owning service says, read directly."""
    order = (await graphql(gateway, ORDER_PAGE, id=ORDER_ID))["data"]["order"]

    async def read(service: str, path: str) -> dict[str, Any]:
        async with shop.client(service) as client:
            return (await client.get(path)).json()

    raw = await read("orders", f"/orders/{ORDER_ID}")
    assert (order["id"], order["status"], order["total"]) == (str(raw["id"]), raw["status"], raw["total"])
    customer = await read("customers", f"/customers/{raw['customerId']}")
    assert order["customer"] == {k: str(customer[k]) if k == "id" else customer[k] for k in ("id", "name", "email", "tier")}
    for item, raw_item in zip(order["items"], raw["items"], strict=True):
        assert (item["quantity"], item["titleAtPurchase"]) == (raw_item["quantity"], raw_item["titleAtPurchase"])
        assert item["unitPrice"] == raw_item["unitPrice"]
        book = await read("catalog", f"/books/{raw_item['bookId']}")
        author = await read("catalog", f"/authors/{book['authorId']}")
        stock = await read("inventory", f"/stock/{raw_item['bookId']}")
        assert item["book"]["title"] == book["title"] and item["book"]["price"] == book["price"]
        assert item["book"]["author"] == {"name": author["name"]}
        assert item["book"]["stock"] == {"available": stock["available"], "inStock": stock["available"] > 0,
                                         "warehouse": stock["warehouse"]}
    payment = (await read("payments", f"/payments?orderIds={ORDER_ID}"))["data"][0]
    assert order["payment"] == {"status": payment["status"], "method": payment["method"], "amount": payment["amount"]}
    shipment = (await read("shipping", f"/shipments?orderIds={ORDER_ID}"))["data"][0]
    assert order["shipment"]["trackingNumber"] == shipment["trackingNumber"]
    assert order["shipment"]["carrier"] == shipment["carrier"]


async def test_a_deleted_book_is_null_with_not_found_at_its_path(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """An order whose book no longer exists shows that item's book as null plus NOT_FOUND; the rest is whole."""
    async with shop.client("orders") as client:
        created = (await client.post("/orders", json={"customerId": 7, "items": [
            {"bookId": 999_999, "quantity": 1, "unitPrice": {"amount": "9.99", "currency": "EUR"}, "titleAtPurchase": "Gone"},
            {"bookId": 12, "quantity": 2, "unitPrice": {"amount": "5.00", "currency": "EUR"}, "titleAtPurchase": "Kept"},
        ]})).json()
    body = await graphql(gateway, ORDER_PAGE, id=str(created["id"]))
    order = body["data"]["order"]
    assert order["items"][0]["book"] is None and order["items"][0]["titleAtPurchase"] == "Gone"
    assert order["items"][1]["book"]["id"] == "12"
    assert order["customer"]["id"] == "7"
    assert order["payment"] is None and order["shipment"] is None  # just placed: none yet, and no error
    assert body["errors"] == [{
        "message": "book 999999 not found", "locations": body["errors"][0]["locations"],
        "path": ["order", "items", 0, "book"], "extensions": {"code": "NOT_FOUND", "service": "catalog"},
    }]


async def test_an_unknown_order_is_null_with_not_found(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """An unknown id gives null at its path and NOT_FOUND, next to the fields that did resolve."""
    body = await graphql(gateway, '{ order(id: 999999) { id } books(ids: ["1", "999998"]) { id } }')
    assert body["data"] == {"order": None, "books": [{"id": "1"}, None]}
    assert sorted((tuple(e["path"]), e["extensions"]["code"]) for e in body["errors"]) == [
        (("books", 1), "NOT_FOUND"), (("order",), "NOT_FOUND")]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"json": {"query": "{ book(id: 1) { nope } }"}}, 200, "Cannot query field 'nope'"),
        ({"json": {"query": "query($id: ID!) { book(id: $id) { title } }", "variables": {"id": {"x": 1}}}}, 200,
         "Variable '$id' has invalid value"),
        ({"json": {"query": "{ book(id: 1) { title "}}, 200, "Syntax Error"),
        ({"json": {"query": '{ book(id: "abc") { title } }'}}, 200, "id must be a positive integer"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "Unable to parse"),
        ({"content": b"{ book(id: 1) { title } }", "headers": {"content-type": "text/plain"}}, 415, "application/json"),
    ],
    ids=["unknown-field", "bad-variable", "syntax", "bad-id", "malformed-json", "wrong-content-type"],
)
async def test_bad_graphql_gets_a_clear_error_and_no_upstream_call(
    gateway: httpx.AsyncClient, shop: Shop, request_kwargs: dict[str, Any], status: int, message: str
) -> None:
    """Bad requests are answered with an error that says what is wrong, before any service is called."""
    response = await gateway.post("/graphql", **request_kwargs)
    assert response.status_code == status
    assert message in response.json()["errors"][0]["message"]
    assert all(not reqs for reqs in (await shop.calls()).values())


async def test_oversized_or_abusive_requests_are_refused_before_any_upstream_call(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """A body over 1 MiB gets 413; a query too deep or with too many aliases or tokens gets an error; no service is called."""
    huge = await gateway.post("/graphql", content=b'{"query": "' + b" " * (1024 * 1024) + b'{ book(id: 1) { id } }"}',
                              headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["errors"][0]["extensions"]["code"] == "REQUEST_TOO_LARGE"
    deep = "{ order(id: 1) { " + "customer { orders { nodes { " * 5 + "id" + " } } }" * 5 + " } }"
    aliases = "{ " + " ".join(f"b{i}: book(id: {i}) {{ id }}" for i in range(1, 60)) + " }"
    tokens = "{ book(id: 1) { " + " ".join(["id"] * 6000) + " } }"
    for query, words in ((deep, "exceeds maximum operation depth"), (aliases, "aliases"), (tokens, "token")):
        body = (await gateway.post("/graphql", json={"query": query})).json()
        assert body["data"] is None and words in body["errors"][0]["message"].lower()
    assert all(not reqs for reqs in (await shop.calls()).values())


async def test_graphql_response_media_type_answers_request_errors_with_400(gateway: httpx.AsyncClient) -> None:
    """With application/graphql-response+json, a validation error is a 400 with no `data` entry."""
    accept = {"accept": "application/graphql-response+json"}
    response = await gateway.post("/graphql", json={"query": "{ book(id: 1) { nope } }"}, headers=accept)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/graphql-response+json")
    assert "data" not in response.json()
    ok = await gateway.post("/graphql", json={"query": "{ book(id: 999999) { title } }"}, headers=accept)
    assert ok.status_code == 200 and ok.json()["data"] == {"book": None}  # a field error is not a request error
    assert ok.headers["content-type"].startswith("application/graphql-response+json")


async def test_get_serves_queries_and_refuses_mutations(gateway: httpx.AsyncClient) -> None:
    """GET runs a query; a mutation over GET is refused."""
    ok = await gateway.get("/graphql", params={"query": "{ book(id: 1) { id } }"})
    assert ok.status_code == 200 and ok.json()["data"] == {"book": {"id": "1"}}
    refused = await gateway.get("/graphql", params={"query": "mutation { x }"})
    assert refused.status_code in (400, 405)
    assert "mutations are not allowed" in refused.json()["errors"][0]["message"]


async def test_graphiql_opens_in_a_browser(gateway: httpx.AsyncClient) -> None:
    """A browser visiting /graphql gets GraphiQL."""
    response = await gateway.get("/graphql", headers={"accept": "text/html"})
    assert response.status_code == 200 and "graphiql" in response.text.lower()


async def test_a_repeated_document_is_validated_once(shop: Shop) -> None:
    """The second run of a document, with other variables, is neither parsed nor validated nor planned again."""
    query = "query($id: ID!) { book(id: $id) { title cacheProbe: isbn } }"
    async with running_gateway(shop) as (client, app):
        view = app.state.graphql
        before = (view.documents.validations, view.planner.planned)
        for book in ("3", "4", "3"):
            assert (await graphql(client, query, id=book))["data"]["book"]["title"]
        assert (view.documents.validations - before[0], view.planner.planned - before[1]) == (1, 1)


def test_exported_sdl_matches_the_code() -> None:
    """schema/schema.graphql is the schema the code serves (regenerate: bookvault schema > schema/schema.graphql)."""
    assert SDL_PATH.read_text() == sdl()


async def test_concurrent_identical_reads_share_one_upstream_call(shop: Shop) -> None:
    """Requests in flight together share identical batch reads; private data only within one caller."""
    await shop.faults("catalog", latencyMs=50, paths=["/books"])
    await shop.faults("customers", latencyMs=50, paths=["/customers"])
    query = '{ book(id: 61) { title } customer(id: 8) { name } }'
    async with running_gateway(shop) as (client, _):

        async def as_caller(who: str) -> dict[str, Any]:
            response = await client.post("/graphql", json={"query": query},
                                         headers=as_customer(None, staff=True, subject=who))
            return response.json()

        bodies = await asyncio.gather(*(as_caller(who) for who in ("alice", "alice", "alice", "bob", "bob")))
    assert all(b["data"] == bodies[0]["data"] and "errors" not in b for b in bodies)
    calls = await shop.calls()
    assert len(calls["catalog"]) == 1  # public: one call for all five requests
    assert len(calls["customers"]) == 2  # private: one per caller
