"""The planned engine and graphql-core's reference execution give identical answers.

Operations are generated at random from the schema (fields, aliases, fragments, inline
fragments, @skip/@include with variables, lists, missing and malformed ids), run against
services that may fail and a cache that may hold stale entries; both executors read the same
upstream answers (in-process stand-ins of the services, so thousands of cases run in about a
minute), and `data`, `errors` (paths, codes, messages, locations) and `extensions` must match.

Fragments are deferred and lists streamed at random too: the reference execution ignores
@defer and @stream, and the planned engine's parts, put together as a client does, must give
the same answer (ARCHITECTURE.md, "Incremental delivery")."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
from graphql import GraphQLList, GraphQLObjectType, get_named_type, is_leaf_type
from graphql.execution.values import VariableValues, get_variable_values
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from gateway.auth import Caller
from gateway import CachePolicy, EntitySource, executable_schema
from gateway.cache import EntityCache, Entry, MemoryLevel
from gateway.config import ResilienceConfig, ServiceConfig
from gateway.context import RequestContext
from gateway.documents import DocumentCache
from gateway.execute import execute_incremental, execute_plan
from gateway.incremental import payloads
from gateway.plan import Planner
from gateway.relations import Loaders
from gateway.resilience import Resilience, partial_result
from gateway.upstream import Upstream
from gateway.errors import format_errors
from gateway.pipeline import execute_reference
from incremental import merged
from schema import BINDINGS, Query

SCHEMA = executable_schema(Query)
GQL = SCHEMA._schema
SERVICES = ("customers", "catalog", "inventory", "orders", "payments", "shipping")
MISSING = 999_999
NOW = 1_000_000.0


def _money(cents: int) -> dict[str, str]:
    return {"amount": f"{cents // 100}.{cents % 100:02d}", "currency": "EUR"}


def _dataset() -> dict[str, dict[int, dict[str, Any]]]:
    rng = random.Random(7)
    authors = {i: {"id": i, "name": f"Author {i}", "bio": f"bio {i}", "version": 1 + i % 3} for i in range(1, 6)}
    books = {i: {"id": i, "title": f"Book {i}", "isbn": f"978-{i:09d}", "price": _money(500 + 37 * i),
                 "publishedYear": 1990 + i, "version": 1 + i % 4, "authorId": 1 + i % 6} for i in range(1, 13)}
    stock = {i: {"bookId": i, "available": i % 3, "warehouse": "north", "version": 2} for i in range(1, 13) if i % 4}
    customers = {i: {"id": i, "name": f"Customer {i}", "email": f"c{i}@example.com", "tier": "gold", "version": 1}
                 for i in range(1, 5)}
    orders, payments, shipments = {}, {}, {}
    for i in range(1, 15):
        items = [{"bookId": rng.choice([*books, MISSING]), "quantity": rng.randint(1, 3), "unitPrice": _money(999),
                  "titleAtPurchase": f"T{i}"} for _ in range(rng.randint(1, 3))]
        orders[i] = {"id": i, "customerId": 1 + i % 5, "status": rng.choice(["PLACED", "PAID", "SHIPPED"]),
                     "placedAt": f"2026-01-{i:02d}T10:00:00+00:00", "total": _money(1000 + i), "items": items,
                     "version": 1 + i % 2}
        if i % 3:
            payments[i] = {"id": 100 + i, "orderId": i, "amount": _money(1000 + i), "method": "card",
                           "status": "CAPTURED", "version": 1}
        if i % 2:
            shipments[i] = {"id": 200 + i, "orderId": i, "carrier": "DHL", "trackingNumber": f"TR{i}",
                            "status": "IN_TRANSIT", "estimatedDelivery": f"2026-02-{i:02d}T00:00:00Z", "version": 1}
    return {"author": authors, "book": books, "stock": stock, "customer": customers, "order": orders,
            "payment": payments, "shipment": shipments}


DATA = _dataset()
ROUTES = {"/customers": ("customer", "ids"), "/books": ("book", "ids"), "/authors": ("author", "ids"),
          "/stock": ("stock", "bookIds"), "/orders": ("order", "ids"), "/payments": ("payment", "orderIds"),
          "/shipments": ("shipment", "orderIds")}


def _cursor(order_id: int) -> str:
    return base64.urlsafe_b64encode(f"order:{order_id}".encode()).decode().rstrip("=")


def _page(customer: int, limit: int, after: int | None = None) -> dict[str, Any]:
    mine = sorted((o for o in DATA["order"].values() if o["customerId"] == customer), key=lambda o: -o["id"])
    total = len(mine)
    if after is not None:
        mine = [o for o in mine if o["id"] < after]
    page = mine[:limit]
    return {"data": page, "nextCursor": _cursor(page[-1]["id"]) if len(mine) > limit else None, "totalCount": total}


class _Services:
    """In-process stand-ins of the six services over `DATA`; `failing` ones answer 503."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        configs = {s: ServiceConfig(name=s, url=f"http://{s}", retries=0) for s in SERVICES}
        resilience = Resilience(configs, ResilienceConfig(breaker_threshold=10**9))
        self.upstream = Upstream(configs, {s: self._transport(s) for s in SERVICES}, resilience)

    def _transport(self, name: str) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: _answer(name, request, self.failing))


def _answer(name: str, request: httpx.Request, failing: set[str]) -> httpx.Response:
    if name in failing:
        return httpx.Response(503, json={"error": {"code": "UNAVAILABLE", "message": "down"}})
    url = urlsplit(str(request.url))
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    if url.path == "/orders" and "customerIds" in q:
        pages = [{"customerId": int(c), **_page(int(c), int(q["limit"]))} for c in q["customerIds"].split(",")]
        return httpx.Response(200, json={"data": pages, "missing": []})
    if url.path == "/orders" and "customerId" in q:
        after = int(base64.urlsafe_b64decode(q["after"] + "==").decode().split(":")[1])
        return httpx.Response(200, json=_page(int(q["customerId"]), int(q["limit"]), after))
    entity, param = ROUTES[url.path]
    ids = [int(i) for i in q[param].split(",")]
    table = DATA[entity]
    body: dict[str, Any] = {"data": [table[i] for i in ids if i in table], "missing": [i for i in ids if i not in table]}
    if url.path == "/books" and q.get("include") == "author":
        # The authors of even books only: the others are read on their own, as from a service that sends fewer.
        authors = {b["authorId"] for b in body["data"] if b["id"] % 2 == 0}
        body["included"] = {"author": [DATA["author"][a] for a in sorted(authors) if a in DATA["author"]]}
    return httpx.Response(200, json=body)


async def _source(upstream: Upstream, stale: list[tuple[str, int]]) -> EntitySource:
    policies = {b.entity: b.policy for b in BINDINGS if b.policy is not None}
    cache = EntityCache(MemoryLevel(10_000), clock=lambda: NOW)
    for entity, key in stale:  # fetched 2 h ago: past every TTL, within every max-stale but authors' (1 day)
        binding = next(b for b in BINDINGS if b.entity == entity)
        payload = DATA[entity].get(key)
        policy: CachePolicy = policies[entity]
        if payload is not None:
            scope = "u:tester" if policy.private else "public"
            await cache.put_many(entity, scope, {key: Entry(payload, payload["version"], NOW - 7200 + key,
                                                            binding.service)}, policy)
    return EntitySource(upstream, cache, policies)


# -- random operations from the schema ----------------------------------------------------

IDS = st.sampled_from(["1", "2", "3", "4", "5", "7", "11", "12", str(MISSING), "abc"])


class _Doc:
    def __init__(self, draw: Any) -> None:
        self.draw = draw
        self.fragments: list[str] = []
        self.variables: dict[str, Any] = {}
        self.definitions: list[str] = []
        self.labels = 0

    def var(self, gql_type: str, value: Any) -> str:
        name = f"v{len(self.variables)}"
        self.variables[name] = value
        self.definitions.append(f"${name}: {gql_type}")
        return f"${name}"

    def directive(self) -> str:
        kind = self.draw(st.sampled_from(["", "", "", "skip", "include"]))
        if not kind:
            return ""
        value = self.draw(st.booleans())
        cond = self.var("Boolean!", value) if self.draw(st.booleans()) else str(value).lower()
        return f" @{kind}(if: {cond})"

    def defer(self) -> str:
        """@defer on a fragment, now and then: plain, labelled, or with `if`."""
        how = self.draw(st.integers(0, 5))
        if how == 0:
            return " @defer"
        if how == 1:
            self.labels += 1
            return f' @defer(label: "d{self.labels}")'
        if how == 2:
            return f" @defer(if: {self.var('Boolean!', self.draw(st.booleans()))})"
        return ""

    def stream(self, field: Any) -> str:
        if not isinstance(getattr(field.type, "of_type", field.type), GraphQLList) or self.draw(st.integers(0, 2)):
            return ""
        return f" @stream(initialCount: {self.draw(st.integers(0, 2))})"

    def args(self, field: str, arg_names: list[str]) -> str:
        parts = []
        for arg in arg_names:
            if arg == "id":
                value = self.draw(IDS)
                parts.append(f"id: {self.var('ID!', value) if self.draw(st.booleans()) else json.dumps(value)}")
            elif arg == "ids":
                value = self.draw(st.lists(IDS, max_size=4))
                parts.append(f"ids: {self.var('[ID!]!', value) if self.draw(st.booleans()) else json.dumps(value)}")
            elif arg == "first" and self.draw(st.booleans()):
                parts.append(f"first: {self.draw(st.sampled_from([1, 2, 3, 0]))}")
            elif arg == "after" and self.draw(st.integers(0, 4)) == 0:
                parts.append(f'after: "{_cursor(self.draw(st.sampled_from([3, 8, 12])))}"')
        return f"({', '.join(parts)})" if parts else ""

    def selection(self, type_: GraphQLObjectType, depth: int) -> str:
        names = sorted(type_.fields)
        chosen = self.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
        parts = []
        for name in chosen:
            field = type_.fields[name]
            named = get_named_type(field.type)
            alias = f"{self.draw(st.sampled_from(['a', 'b']))}_{name}: " if self.draw(st.integers(0, 3)) == 0 else ""
            text = f"{alias}{name}{self.args(name, list(field.args))}{self.directive()}{self.stream(field)}"
            if not is_leaf_type(named):
                if depth <= 0:
                    continue
                text += " { " + self.selection(named, depth - 1) + " }"  # type: ignore[arg-type]
            parts.append(self.wrap(type_, text))
        if self.draw(st.integers(0, 5)) == 0:
            parts.append("__typename")
        return " ".join(parts) or "__typename"

    def wrap(self, type_: GraphQLObjectType, text: str) -> str:
        how = self.draw(st.integers(0, 6))
        if how == 0:
            return f"... on {type_.name}{self.directive()}{self.defer()} {{ {text} }}"
        if how == 1:
            return f"...{self.directive()}{self.defer()} {{ {text} }}"
        if how == 2:
            name = f"F{len(self.fragments)}"
            self.fragments.append(f"fragment {name} on {type_.name} {{ {text} }}")
            return f"...{name}{self.directive()}{self.defer()}"
        return text

    def text(self, selection: str) -> str:
        head = f"query Q({', '.join(self.definitions)})" if self.definitions else "query Q"
        return " ".join([f"{head} {{ {selection} }}", *self.fragments])


@st.composite
def operations(draw: Any) -> tuple[str, dict[str, Any]]:
    doc = _Doc(draw)
    selection = doc.selection(GQL.query_type, draw(st.integers(1, 3)))  # type: ignore[arg-type]
    return doc.text(selection), doc.variables


STALE = st.lists(st.tuples(st.sampled_from(["book", "author", "stock", "customer", "order", "payment", "shipment"]),
                           st.integers(1, 14)), max_size=12)


def _normal(data: Any, errors: list[dict[str, Any]], extensions: dict[str, Any], non_null: set[str]
            ) -> dict[str, Any]:
    stale = sorted(extensions.pop("stale", []), key=json.dumps)
    if data is None:
        # A root field that is null in a non-null position nulls `data`; which other fields'
        # errors graphql-core has recorded by then depends on its scheduling, so only the
        # errors of the non-null root fields themselves are compared (GraphQL spec, "Handling
        # Field Errors": the null propagates to `data`).
        errors = [e for e in errors if len(e.get("path", ())) == 1 and e["path"][0] in non_null]
        extensions = {k: v for k, v in extensions.items() if k not in ("complete", "failedServices")}
        stale = []
    data = json.loads(orjson.dumps(data))  # a kept answer's is its JSON already (gateway/memo.py)
    return {"data": json.dumps(data), "errors": sorted(errors, key=json.dumps), "stale": stale, "ext": extensions}


async def _both(services: _Services, query: str, variables: dict[str, Any], failing: set[str],
                stale: list[tuple[str, int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    services.failing = failing
    documents, planner = DocumentCache(GQL), Planner(GQL)
    document = documents.get(query)
    assert not document.errors, document.errors
    operation = document.operation(None)
    values = get_variable_values(GQL, operation.variable_definitions or (), variables)  # type: ignore[union-attr]
    assert isinstance(values, VariableValues)
    plan = planner.plan(document, operation, values)  # type: ignore[arg-type]
    assert plan is not None, query

    source = await _source(services.upstream, stale)
    reader = source.reader(Caller("tester", staff=True))
    context = RequestContext(None, reader, Loaders(reader))  # type: ignore[arg-type]
    result = await execute_reference(SCHEMA, document, variables, None, context)
    ref_errors = format_errors(result.errors or [])
    ref_ext = {**context.extensions, **partial_result(e.get("extensions", {}) for e in ref_errors if "path" in e)}

    source = await _source(services.upstream, stale)
    non_null = {f.key for f in plan.root if f.non_null}
    reference = _normal(result.data, ref_errors, ref_ext, non_null)
    planned = None
    # Three times on one source: the second run finds what the first cached fresh, and reads
    # it without an await (`Reader.peek`), the rest as the first did; where the second read
    # everything so and met no error, the third is its kept answer (gateway/memo.py). The same
    # answer each time.
    for _ in range(3):
        data, errors, stale_served = await execute_plan(plan, values, source.reader(Caller("tester", staff=True)))
        planned_errors = format_errors(errors)
        planned_ext = partial_result(e.get("extensions", {}) for e in planned_errors if "path" in e)
        if stale_served:
            planned_ext["stale"] = stale_served
        again = _normal(data, planned_errors, planned_ext, non_null)
        assert planned is None or again == planned, query
        planned = again
    incremental = planner.plan(document, operation, values, incremental=True)  # type: ignore[arg-type]
    if incremental is not None and incremental.incremental:
        source = await _source(services.upstream, stale)
        # Put together, every part lands on an object of the parts before it (none on a null).
        answer = merged([p async for p in payloads(execute_incremental(incremental, values, source.reader(Caller("tester", staff=True))),
                                                   format_errors, lambda part, errors: {"stale": part.stale})])
    if incremental is not None and incremental.incremental and _no_propagation(result.data, ref_errors):
        # A null in a non-null position stops at the deferred fragment or streamed items
        # it happened in (the parts before stand), so only answers without one compare.
        errors = list({json.dumps(e, sort_keys=True): e for e in answer["errors"]}.values())  # a field in two parts: one error
        ext = partial_result(e.get("extensions", {}) for e in errors if "path" in e)
        if answer["stale"]:
            ext["stale"] = list({json.dumps(e, sort_keys=True): e for e in answer["stale"]}.values())
        together = _normal(answer["data"], errors, ext, non_null)
        # Deferred fields come after the others: the same answer, its keys in another order.
        assert {**together, "data": json.loads(together["data"])} == {**reference, "data": json.loads(reference["data"])}, query
    return reference, planned


def _no_propagation(data: Any, errors: list[dict[str, Any]]) -> bool:
    """Every error's path leads to a null in `data`: no null went past the field it was in."""
    for error in errors:
        node = data
        try:
            for key in error.get("path", ()):
                node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
        if node is not None:
            return False
    return True


SHARED = _Services()  # one set of clients for all generated cases: MockTransport needs no event loop of its own


@settings(max_examples=int(os.environ.get("BOOKVAULT_DIFFERENTIAL_EXAMPLES", "2000")), deadline=None, phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck), derandomize=True)
@given(op=operations(), failing=st.sets(st.sampled_from(SERVICES), max_size=3), stale=STALE)
async def test_planned_and_reference_execution_agree(op: tuple[str, dict[str, Any]], failing: set[str],
                                                     stale: list[tuple[str, int]]) -> None:
    """Random operations give identical data, errors and extensions from both executors."""
    query, variables = op
    assume(not DocumentCache(GQL).get(query).errors)  # the generator may write fields that cannot merge
    reference, planned = await _both(SHARED, query, variables, failing, stale)
    assert planned == reference, query


async def test_the_example_pages_agree_with_services_down() -> None:
    """The order page and the order history agree with every service down in turn, some entries stale."""
    examples = Path(__file__).resolve().parent.parent / "schema" / "examples"
    history = ("query($id: ID!) { customer(id: $id) { name orders(first: 3) { totalCount pageInfo { hasNextPage endCursor }"
               " nodes { id items { quantity book { title author { name } stock { inStock } } } payment { status }"
               " shipment { status } } } } }")
    for query, variables in (((examples / "order_page.graphql").read_text(), {"id": "5"}), (history, {"id": "2"})):
        for down in [set(), *({s} for s in SERVICES)]:
            reference, planned = await _both(_Services(), query, variables, down,
                                             [("book", 3), ("order", 5), ("payment", 5)])
            assert planned == reference, (down, query)
            assert json.loads(reference["data"]) is not None
