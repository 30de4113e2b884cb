"""Introspection tools can use, and that cannot be abused (README, "Limits and cost"): every
standard introspection query passes the default limits, a deep or wide one is refused
cheaply with INTROSPECTION_LIMIT_EXCEEDED, and the SDL has a URL of its own."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from graphql import build_client_schema, get_introspection_query

from shop import Shop, health_latencies, on_a_real_port, running_gateway
from test_front_door import no_upstream_calls

EVERY_OPTION = {"descriptions": True, "specified_by_url": True, "directive_is_repeatable": True,
                "schema_description": True, "input_value_deprecation": True, "one_of": True,
                "experimental_directive_deprecation": True}
# Apollo's (rover, Apollo Client devtools) and graphql-codegen's are graphql-js's query with
# these options; GraphiQL 3's is the default one with inputValueDeprecation.
STANDARD = {
    "graphql-js defaults": get_introspection_query(),
    "graphql-js every option": get_introspection_query(**EVERY_OPTION),
    "graphiql": get_introspection_query(input_value_deprecation=True),
    "codegen": get_introspection_query(descriptions=True, specified_by_url=True, directive_is_repeatable=True,
                                       schema_description=True, input_value_deprecation=True),
    "deep ofType (typeDepth 16)": get_introspection_query(type_depth=16),
}


def _nested_lists(count: int) -> str:
    inner = "name"
    for _ in range(count):
        inner = f"fields {{ type {{ {inner} }} }}"
    return f"{{ __schema {{ types {{ {inner} }} }} }}"


def _of_type(count: int) -> str:
    inner = "kind"
    for _ in range(count):
        inner = f"kind ofType {{ {inner} }}"
    return f'{{ __type(name: "Book") {{ fields {{ type {{ {inner} }} }} }} }}'


ABUSE = {
    "3 nested lists": _nested_lists(3),
    "17 nested ofType": _of_type(17),
    "4 __schema": "{ " + " ".join(f"s{i}: __schema {{ types {{ name }} }}" for i in range(4)) + " }",
    "lists through fragments": "query { __schema { types { ...A } } } fragment A on __Type { fields { type { ...B } } } "
                               "fragment B on __Type { fields { type { ...C } } } fragment C on __Type { fields { name } }",
}


@pytest.mark.parametrize("name", STANDARD)
async def test_standard_introspection_queries_pass_the_default_limits(shop: Shop, name: str) -> None:
    """graphql-js's getIntrospectionQuery (every option), GraphiQL's and codegen's: answered, and a client schema builds from the answer."""
    async with running_gateway(shop) as (client, _):
        answer = (await client.post("/graphql", json={"query": STANDARD[name]})).json()
    assert "errors" not in answer, answer.get("errors")
    schema = build_client_schema(answer["data"])
    assert {"book", "books", "order"} <= set(schema.query_type.fields)  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ABUSE)
async def test_introspection_past_its_bounds_is_refused_before_it_runs(shop: Shop, name: str) -> None:
    """Nested lists, a long ofType chain, many __schema fields: INTROSPECTION_LIMIT_EXCEEDED, and nothing is called."""
    async with running_gateway(shop) as (client, _):
        await shop.reset_stats()
        answer = (await client.post("/graphql", json={"query": ABUSE[name]})).json()
        assert await no_upstream_calls(shop)
    assert answer["data"] is None
    assert [e["extensions"]["code"] for e in answer["errors"]] == ["INTROSPECTION_LIMIT_EXCEEDED"]


async def test_health_answers_during_a_burst_of_hostile_introspection(shop: Shop) -> None:
    """Two hundred distinct over-deep introspection queries, sent at once: each refused with its code while /healthz keeps answering."""
    async with running_gateway(shop) as (_, app), on_a_real_port(app) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        # Each text is new (an alias differs), so each is parsed and checked, not found in the cache.
        queries = [_of_type(17).replace("__type(", f"t{i}: __type(") for i in range(200)]
        burst = asyncio.gather(*(client.post("/graphql", json={"query": q}) for q in queries))
        latencies = await health_latencies(client, burst)
        answers = await burst
    assert {a.json()["errors"][0]["extensions"]["code"] for a in answers} == {"INTROSPECTION_LIMIT_EXCEEDED"}
    # How fast is bench/hostile_bench.py's measure; here only that it never stalls.
    assert max(latencies) < 1.0, f"slowest /healthz {max(latencies) * 1000:.0f} ms of {len(latencies)}"


async def test_an_introspection_answer_is_computed_once(shop: Shop) -> None:
    """GraphiQL's introspection asked twice: the same answer, the second from the kept copy."""
    async with running_gateway(shop) as (client, app):
        query = {"query": STANDARD["graphiql"]}
        first = (await client.post("/graphql", json=query)).json()
        kept = dict(app.state.graphql.introspection_answers)
        second = (await client.post("/graphql", json=query)).json()
        assert second["data"] == first["data"] and len(kept) == 1
        assert next(iter(kept.values())) is next(iter(app.state.graphql.introspection_answers.values()))


async def test_the_sdl_has_a_url_that_follows_the_introspection_setting(shop: Shop) -> None:
    """GET /graphql/schema.graphql is the SDL when introspection is on, 404 when it is off."""
    async with running_gateway(shop) as (client, _):
        on = await client.get("/graphql/schema.graphql")
    assert on.status_code == 200 and on.headers["content-type"].startswith("application/graphql")
    assert "type Query {" in on.text and "book(id: ID!): Book" in on.text
    async with running_gateway(shop, introspection=False) as (client, _):
        off = await client.get("/graphql/schema.graphql")
    assert off.status_code == 404 and "type Query" not in off.text
