"""The front door: hostile requests refused before any upstream call, each with a code; the
cost of an operation; the request's deadline; persisted queries (APQ, memory and a real
Redis) and trusted documents; introspection as a setting."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bookvault.cli import main as bookvault
from schema import SDL_PATH
from shop import Shop, health_latencies, on_a_real_port, running_gateway
from test_engine import _fragment_bomb

ORDER_PAGE = (SDL_PATH.parent / "examples" / "order_page.graphql").read_text()
ORDER_HISTORY = (SDL_PATH.parent / "examples" / "order_history.graphql").read_text()
BOOKS = (SDL_PATH.parent / "examples" / "books.graphql").read_text()
JSON = {"content-type": "application/json"}

FIFTY_ALIASES_OF_500_IDS = ("query($ids: [ID!]!) { "
                            + " ".join(f"o{i}: orders(ids: $ids) {{ id }}" for i in range(50)) + " }")
DEPTH_TEN_CHAIN = ("{ customer(id: 1) { " + "orders(first: 100) { nodes { customer { " * 3 + "id"
                   + " } } }" * 3 + " } }")
# Within every limit, and the slowest kind of document to validate: repeated fields of one
# response name make graphql-core compare every pair.
HEAVY = "{ " + " ".join(["book(id: 1) { id }"] * 95) + " }"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def no_upstream_calls(shop: Shop) -> bool:
    return all(not requests for requests in (await shop.calls()).values())


CATALOGUE: dict[str, tuple[dict[str, Any], int, str]] = {
    "fragment-bomb-30-levels": ({"json": {"query": _fragment_bomb(30, alias=True)}}, 200, "ALIAS_LIMIT_EXCEEDED"),
    "fragment-cycle": ({"json": {"query": "{ book(id: 1) { ...A } } fragment A on Book { title ...B } "
                                          "fragment B on Book { isbn ...A }"}}, 200, "GRAPHQL_VALIDATION_FAILED"),
    "depth": ({"json": {"query": "{ order(id: 1) { " + "customer { orders { nodes { " * 5 + "id"
                                 + " } } }" * 5 + " } }"}}, 200, "DEPTH_LIMIT_EXCEEDED"),
    "aliases": ({"json": {"query": "{ " + " ".join(f"b{i}: book(id: {i}) {{ id }}" for i in range(1, 60)) + " }"}},
                200, "ALIAS_LIMIT_EXCEEDED"),
    "tokens": ({"json": {"query": "{ book(id: 1) { " + " ".join(["id"] * 6000) + " } }"}}, 200,
               "TOKEN_LIMIT_EXCEEDED"),
    "selections": ({"json": {"query": "{ book(id: 1) { " + " ".join(["price { amount }"] * 200) + " } }"}}, 200,
                   "FIELD_LIMIT_EXCEEDED"),
    "10000-ids-inline": ({"json": {"query": "{ books(ids: [" + ",".join(map(str, range(1, 10_001))) + "]) { id } }"}},
                         200, "LENGTH_LIMIT_EXCEEDED"),
    "10000-ids-as-variables": ({"json": {"query": "query($ids: [ID!]!) { books(ids: $ids) { id } }",
                                         "variables": {"ids": [str(i) for i in range(1, 10_001)]}}},
                               200, "IDS_LIMIT_EXCEEDED"),
    "json-array-of-operations": ({"json": [{"query": "{ book(id: 1) { id } }"}] * 2}, 400, "BAD_REQUEST"),
    "10-mb-body": ({"content": b'{"query": "' + b" " * (10 * 1024 * 1024) + b'{ book(id: 1) { id } }"}',
                    "headers": JSON}, 413, "REQUEST_TOO_LARGE"),
    "text-plain": ({"content": b'{"query": "{ book(id: 1) { id } }"}', "headers": {"content-type": "text/plain"}},
                   415, "UNSUPPORTED_MEDIA_TYPE"),
    "form-urlencoded": ({"data": {"query": "{ book(id: 1) { id } }"}}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    "multipart": ({"files": {"query": ("q.graphql", b"{ book(id: 1) { id } }")}}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    "50-aliases-of-500-ids": ({"json": {"query": FIFTY_ALIASES_OF_500_IDS,
                                        "variables": {"ids": [str(i) for i in range(1, 501)]}}},
                              200, "COST_LIMIT_EXCEEDED"),
    "depth-10-customer-orders-chain": ({"json": {"query": DEPTH_TEN_CHAIN}}, 200, "COST_LIMIT_EXCEEDED"),
}


@pytest.mark.parametrize("name", list(CATALOGUE))
async def test_hostile_requests_are_refused_with_a_code_and_no_upstream_call(
    gateway: httpx.AsyncClient, shop: Shop, name: str
) -> None:
    """Each request of the hostile catalogue gets its status and error code, and no service is called."""
    request, status, code = CATALOGUE[name]
    response = await gateway.post("/graphql", **request)
    assert response.status_code == status, response.text[:300]
    (error,) = response.json()["errors"]
    assert error["extensions"]["code"] == code
    assert "Traceback" not in error["message"] and "Syntax Error" not in error["message"]
    assert await no_upstream_calls(shop)


async def test_a_mutation_over_get_is_405_with_allow_post(gateway: httpx.AsyncClient, shop: Shop) -> None:
    """GET never runs a mutation: 405, `Allow: POST`, METHOD_NOT_ALLOWED."""
    response = await gateway.get("/graphql", params={"query": "mutation { placeOrder { id } }"})
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["errors"][0]["extensions"]["code"] == "METHOD_NOT_ALLOWED"
    assert await no_upstream_calls(shop)


async def test_the_token_limit_says_it_is_a_limit(gateway: httpx.AsyncClient) -> None:
    """Too many tokens is reported as the limit it is, with the limit, not as a syntax error."""
    body = (await gateway.post("/graphql", json={"query": "{ book(id: 1) { " + "id " * 6000 + "} }"})).json()
    (error,) = body["errors"]
    assert error["message"] == "The document has more than 5000 tokens: the limit is 5000"
    assert error["extensions"] == {"code": "TOKEN_LIMIT_EXCEEDED", "limit": 5000}


async def test_expensive_valid_operations_are_refused_with_their_cost_and_the_limit(gateway: httpx.AsyncClient,
                                                                                    shop: Shop) -> None:
    """50 aliases of 500 ids and a depth-10 customer/orders chain are refused by cost, saying cost and limit."""
    ids = [str(i) for i in range(1, 501)]
    aliases = (await gateway.post("/graphql", json={"query": FIFTY_ALIASES_OF_500_IDS, "variables": {"ids": ids}})).json()
    chain = (await gateway.post("/graphql", json={"query": DEPTH_TEN_CHAIN})).json()
    assert aliases["errors"][0]["extensions"] == {"code": "COST_LIMIT_EXCEEDED", "cost": 25_250, "calls": 250,
                                                  "entities": 25_000, "limit": 2000}
    assert chain["errors"][0]["extensions"]["cost"] > 1_000_000
    assert await no_upstream_calls(shop)


async def test_the_example_pages_fit_the_default_budget_and_say_their_cost_when_asked(
    gateway: httpx.AsyncClient,
) -> None:
    """The order page, order history and books examples run; with {"cost": true} the answer says their cost."""
    costs = {}
    for name, query, variables in (("order_page", ORDER_PAGE, {"id": "4850"}),
                                   ("order_history", ORDER_HISTORY, {"id": "7"}), ("books", BOOKS, {})):
        body = (await gateway.post("/graphql", json={"query": query, "variables": variables,
                                                      "extensions": {"cost": True}})).json()
        assert body["data"] and all(e["extensions"]["code"] == "NOT_FOUND" for e in body.get("errors", ()))
        costs[name] = body["extensions"]["cost"]
    assert {name: c["cost"] for name, c in costs.items()} == {"order_page": 26, "order_history": 267, "books": 15}
    assert all(c["limit"] == 2000 for c in costs.values())
    plain = (await gateway.post("/graphql", json={"query": BOOKS})).json()
    assert "cost" not in plain.get("extensions", {})
    by_header = (await gateway.post("/graphql", json={"query": BOOKS}, headers={"x-bookvault-cost": "1"})).json()
    assert by_header["extensions"]["cost"]["cost"] == 15


async def test_the_budget_and_the_ids_per_field_are_settings(shop: Shop) -> None:
    """BOOKVAULT_MAX_COST and BOOKVAULT_MAX_IDS move the limits: 600 ids pass a raised limit, the order page a lowered budget does not."""
    ids = [str(i) for i in range(1, 601)]
    query = "query($ids: [ID!]!) { books(ids: $ids) { id } }"
    async with running_gateway(shop, max_ids=1000, max_cost=20) as (client, _):
        body = (await client.post("/graphql", json={"query": query, "variables": {"ids": ids}})).json()
        assert body["errors"][0]["extensions"]["code"] == "COST_LIMIT_EXCEEDED"  # not the ids limit
        page = (await client.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": "4850"}})).json()
        assert page["errors"][0]["extensions"] == {"code": "COST_LIMIT_EXCEEDED", "cost": 26, "calls": 7,
                                                   "entities": 19, "limit": 20}
    async with running_gateway(shop, max_ids=1000) as (client, _):
        body = (await client.post("/graphql", json={"query": query, "variables": {"ids": ids}})).json()
        assert len(body["data"]["books"]) == 600


async def test_the_cost_is_computed_once_per_document_and_variables_shape(shop: Shop) -> None:
    """Other ids of the same count reuse the cost; another count is a new estimate."""
    query = "query($ids: [ID!]!) { books(ids: $ids) { id } }"
    async with running_gateway(shop) as (client, app):
        costs = app.state.graphql.costs
        before = costs.computed
        for ids in (["1", "2"], ["3", "4"], ["5", "6", "7"]):
            assert (await client.post("/graphql", json={"query": query, "variables": {"ids": ids}})).status_code == 200
        assert costs.computed - before == 2


async def test_health_checks_answer_while_a_heavy_document_is_validated(shop: Shop) -> None:
    """A document within the limits but slow to validate, and the fragment bomb, leave /healthz answering at once (real port)."""
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url, httpx.AsyncClient(base_url=url) as client:
        for query, slow in ((HEAVY, True), (_fragment_bomb(30, alias=True), False)):
            heavy = asyncio.ensure_future(client.post("/graphql", json={"query": query}))
            latencies = await health_latencies(client, heavy)
            response = await heavy
            assert response.status_code == 200, response.text[:200]
            # Answered while the document was loading; how fast is bench/hostile_bench.py's
            # measure (a shared 2-core machine makes a tight bound here flaky).
            worst = max(latencies)
            # The heavy document takes long enough for several health checks; the bomb is refused
            # in one pass (its fragments measured once), often before a second one.
            assert (len(latencies) > 1 or not slow) and worst < 1.0, f"slowest /healthz {worst * 1000:.0f} ms of {len(latencies)}"
    assert routes_called(await shop.calls()) == ["/books"]  # the heavy document ran: one call


def routes_called(calls: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [c["route"] for requests in calls.values() for c in requests]


async def test_a_request_whose_budget_is_gone_before_execution_is_refused(gateway: httpx.AsyncClient,
                                                                          shop: Shop) -> None:
    """A request with no time left after parsing and validation gets 504 DEADLINE_EXCEEDED and calls nothing."""
    response = await gateway.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": "4850"}},
                                  headers={"x-request-deadline-ms": "0"})
    assert response.status_code == 504
    assert response.json()["errors"][0]["extensions"]["code"] == "DEADLINE_EXCEEDED"
    assert await no_upstream_calls(shop)


@pytest.mark.parametrize(("method", "params"), [
    ("POST", {"query": "{ book(id: 1) { id } }", "variables": ["x"]}),
    ("POST", {"query": "{ book(id: 1) { id } }", "operationName": 7}),
    ("POST", {"query": "{ book(id: 1) { id } }", "extensions": "yes"}),
    ("POST", {"query": 42}),
    ("POST", {"query": "{ book(id: 1) { id } }", "extensions": {"persistedQuery": {"version": 1, "sha256Hash": "x"}}}),
    ("GET", {"query": "{ book(id: 1) { id } }", "variables": "[1, 2]"}),
    ("GET", {"query": "{ book(id: 1) { id } }", "variables": "{not json"}),
    ("GET", {"query": "{ book(id: 1) { id } }", "extensions": "17"}),
], ids=["post-variables-list", "post-operation-name-number", "post-extensions-string", "post-query-number",
        "post-bad-hash", "get-variables-list", "get-variables-not-json", "get-extensions-number"])
async def test_malformed_parameters_are_400_bad_request_in_plain_words(
    gateway: httpx.AsyncClient, shop: Shop, method: str, params: dict[str, Any]
) -> None:
    """Parameters of the wrong JSON type are a 400 BAD_REQUEST that names the parameter, with no Python in it."""
    if method == "POST":
        response = await gateway.post("/graphql", json=params)
    else:
        response = await gateway.get("/graphql", params=params)
    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert error["extensions"]["code"] == "BAD_REQUEST"
    assert not any(word in error["message"] for word in ("Traceback", "Error(", "object has no", "NoneType"))
    assert await no_upstream_calls(shop)


async def test_every_request_error_has_a_code(gateway: httpx.AsyncClient) -> None:
    """Syntax, validation, variables and operation-name errors carry codes a client can switch on."""
    cases = {
        "{ book(id: 1) { title ": "GRAPHQL_PARSE_FAILED",
        "{ book(id: 1) { nope } }": "GRAPHQL_VALIDATION_FAILED",
    }
    for query, code in cases.items():
        body = (await gateway.post("/graphql", json={"query": query})).json()
        assert body["errors"][0]["extensions"]["code"] == code
    bad_variable = (await gateway.post("/graphql", json={"query": "query($id: ID!) { book(id: $id) { id } }",
                                                         "variables": {"id": {"x": 1}}})).json()
    assert bad_variable["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    two = "query A { book(id: 1) { id } } query B { book(id: 2) { id } }"
    unnamed = (await gateway.post("/graphql", json={"query": two})).json()
    assert unnamed["errors"][0]["extensions"]["code"] == "OPERATION_RESOLUTION_FAILURE"


async def test_introspection_and_suggestions_follow_the_setting(shop: Shop) -> None:
    """Introspection on (the default) answers __schema and suggests fields; off, __schema is refused and nothing is suggested."""
    async with running_gateway(shop) as (client, _):
        on = (await client.post("/graphql", json={"query": "{ __schema { queryType { name } } }"})).json()
        assert on["data"] == {"__schema": {"queryType": {"name": "Query"}}}
        typo = (await client.post("/graphql", json={"query": "{ book(id: 1) { titel } }"})).json()
        assert "Did you mean" in typo["errors"][0]["message"]
    async with running_gateway(shop, introspection=False) as (client, _):
        for query in ("{ __schema { queryType { name } } }", '{ __type(name: "Book") { name } }'):
            off = (await client.post("/graphql", json={"query": query})).json()
            assert off["data"] is None and off["errors"][0]["extensions"]["code"] == "INTROSPECTION_DISABLED"
        typo = (await client.post("/graphql", json={"query": "{ book(id: 1) { titel } }"})).json()
        assert "Did you mean" not in typo["errors"][0]["message"]


# -- automatic persisted queries ---------------------------------------------------------------


def persisted(query: str) -> dict[str, Any]:
    return {"persistedQuery": {"version": 1, "sha256Hash": sha(query)}}


async def apq(client: httpx.AsyncClient, method: str, query: str, send_query: bool, **variables: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"extensions": persisted(query), "variables": variables}
    if send_query:
        params["query"] = query
    if method == "POST":
        response = await client.post("/graphql", json=params)
    else:
        response = await client.get("/graphql", params={k: v if isinstance(v, str) else json.dumps(v)
                                                        for k, v in params.items()})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_automatic_persisted_queries_register_on_first_sight(gateway: httpx.AsyncClient, shop: Shop,
                                                                   method: str) -> None:
    """Hash only: PERSISTED_QUERY_NOT_FOUND; hash and query: answered and registered; hash only again: answered."""
    query = f"query Apq{method}($id: ID!) {{ book(id: $id) {{ title }} }}"
    missing = await apq(gateway, method, query, False, id="3")
    assert missing["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    assert missing["errors"][0]["message"] == "PersistedQueryNotFound"
    assert await no_upstream_calls(shop)
    registered = await apq(gateway, method, query, True, id="3")
    again = await apq(gateway, method, query, False, id="3")
    assert registered["data"]["book"]["title"] and again["data"] == registered["data"]


async def test_a_persisted_query_whose_hash_is_not_its_own_is_refused(gateway: httpx.AsyncClient,
                                                                     shop: Shop) -> None:
    """A query sent with another query's hash is refused (400 PERSISTED_QUERY_HASH_MISMATCH) and not registered."""
    query, other = "{ book(id: 1) { title } }", "{ book(id: 2) { title } }"
    for method in ("POST", "GET"):
        params = {"query": query, "extensions": persisted(other)}
        if method == "POST":
            response = await gateway.post("/graphql", json=params)
        else:
            response = await gateway.get("/graphql", params={"query": query, "extensions": json.dumps(persisted(other))})
        assert response.status_code == 400
        assert response.json()["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_HASH_MISMATCH"
    later = await apq(gateway, "POST", other, False)
    assert later["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    assert await no_upstream_calls(shop)


@pytest.fixture
async def redis_namespace() -> AsyncIterator[str]:
    """A key namespace of this test's own in the local Redis; its keys are deleted afterwards."""
    namespace = f"bvtest-{uuid.uuid4().hex[:12]}"
    yield namespace
    client = aioredis.from_url("redis://127.0.0.1:6379/0", socket_timeout=2)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_persisted_queries_are_shared_by_instances_through_redis(shop: Shop, redis_namespace: str) -> None:
    """A query registered at one gateway is answered by hash alone at another sharing the Redis."""
    query = "query Shared($id: ID!) { book(id: $id) { title } }"
    redis = {"redis_url": "redis://127.0.0.1:6379/0", "cache_namespace": redis_namespace}
    async with running_gateway(shop, **redis) as (first, _), running_gateway(shop, **redis) as (second, _):
        assert (await apq(second, "GET", query, False, id="9"))["errors"][0]["extensions"]["code"] == \
            "PERSISTED_QUERY_NOT_FOUND"
        registered = await apq(first, "POST", query, True, id="9")
        by_hash = await apq(second, "GET", query, False, id="9")
        assert by_hash["data"] == registered["data"] and registered["data"]["book"]["title"]
    client = aioredis.from_url("redis://127.0.0.1:6379/0", decode_responses=True, socket_timeout=2)
    try:
        assert await client.get(f"{redis_namespace}:apq:{sha(query)}") == query
    finally:
        await client.aclose()


async def test_the_memory_store_keeps_the_most_recent_queries(shop: Shop) -> None:
    """With BOOKVAULT_APQ_MAX_ENTRIES=2, a third query pushes the least recently used one out."""
    queries = [f"{{ book(id: {i}) {{ id }} }}" for i in (1, 2, 3)]
    async with running_gateway(shop, apq_max_entries=2) as (client, _):
        for query in queries:
            assert "data" in await apq(client, "POST", query, True)
        oldest = await apq(client, "POST", queries[0], False)
        newest = await apq(client, "POST", queries[2], False)
    assert oldest["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    assert newest["data"] == {"book": {"id": "3"}}


# -- trusted documents -------------------------------------------------------------------------


@pytest.fixture
def examples_manifest(tmp_path: Path) -> Path:
    """`bookvault manifest` of schema/examples/."""
    path = tmp_path / "manifest.json"
    assert bookvault(["manifest", "--output", str(path)]) == 0
    return path


async def test_trusted_documents_run_only_listed_operations(shop: Shop, examples_manifest: Path) -> None:
    """With a manifest, its operations run by id, by hash or by identical body; anything else is PERSISTED_QUERY_NOT_LISTED."""
    manifest = json.loads(examples_manifest.read_text())
    page = next(op for op in manifest["operations"] if op["name"] == "OrderPage")
    assert page["id"] == sha(ORDER_PAGE) and page["type"] == "query"
    async with running_gateway(shop, trusted_documents=str(examples_manifest)) as (client, _):
        by_id = (await client.post("/graphql", json={"documentId": page["id"], "variables": {"id": "4850"}})).json()
        assert by_id["data"]["order"]["id"] == "4850"
        by_hash = (await client.get("/graphql", params={"extensions": json.dumps(persisted(ORDER_PAGE)),
                                                        "variables": '{"id": "4850"}'})).json()
        by_body = (await client.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": "4850"}})).json()
        assert by_hash["data"] == by_body["data"] == by_id["data"]
        await shop.reset_stats()
        for params in ({"query": "{ book(id: 1) { title } }"},
                       {"query": "{ book(id: 1) { title } }", "extensions": persisted("{ book(id: 1) { title } }")},
                       {"documentId": sha("{ book(id: 1) { title } }")},
                       {"query": "{ __schema { queryType { name } } }"}):
            refused = await client.post("/graphql", json=params)
            assert refused.status_code == 400
            assert refused.json()["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_LISTED"
        assert await no_upstream_calls(shop)


def test_a_relay_map_is_a_manifest_too() -> None:
    """Relay's {id: body} map lists its operations by id and by their bodies' hashes."""
    from gateway.persisted import TrustedDocuments

    trusted = TrustedDocuments.parse({"abc123": BOOKS})
    assert trusted.get("abc123") == BOOKS == trusted.get(sha(BOOKS)) == trusted.get("sha256:" + sha(BOOKS))
    with pytest.raises(ValueError, match="neither"):
        TrustedDocuments.parse(["not", "a", "manifest"])
