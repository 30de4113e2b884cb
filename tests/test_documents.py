"""The document cache's worker process (gateway/documents.py): a new text is parsed and
validated off the event loop's process, with the same outcome as in place; and what the
cache keeps of texts seen once (nothing past a small window)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import weakref

from graphql import GraphQLError, print_ast
from graphql.execution.values import VariableValues, get_variable_values

from gateway import executable_schema
from gateway.documents import Document, DocumentCache, Limits
from gateway.plan import Plan, Planner
from schema import API, SDL_PATH
from shop import Shop, running_gateway
from test_front_door import HEAVY

SCHEMA = executable_schema(API.query, API.mutation)._schema
EXAMPLES = [p.read_text() for p in sorted((SDL_PATH.parent / "examples").glob("*.graphql"))]
TEXTS = [
    *EXAMPLES,
    "query($id: ID!, $full: Boolean!) { order(id: $id) { id payment @include(if: $full) { status } } }",
    "{ book(id: 1) { title ",  # a syntax error, with its location
    "{ book(id: 1) { nope } }",  # a validation error, with its location
    "query A { me { id } } query B { me { name } }",  # two operations
    "{ " + "book(id: 1) { id } " * 300 + "}",  # over the selection limit
    "{ __schema { types { name } } }",  # introspection, refused below
    "{ a " * 3000 + "}" * 3000,  # over the token limit
]


def outcome(document: Document) -> tuple[object, ...]:
    # A refused document keeps only its operations' names and kinds (what the view reads).
    node = document.node
    shape = print_ast(node) if node and not document.errors else (
        [(d.operation.value, d.name.value if d.name else None) for d in node.definitions] if node else None)
    return (document.hash, [e.formatted for e in document.errors], sorted(map(str, document.operations)),
            document.directive_variables, shape, document.validated)


async def test_a_worker_process_loads_documents_as_they_are_loaded_in_place() -> None:
    """Errors (messages, codes, locations), operations, @skip/@include variables and the AST agree (a refused
    document's AST is only its operations' outline)."""
    limits = Limits(introspection=False)
    in_place, away = DocumentCache(SCHEMA, limits), DocumentCache(SCHEMA, limits, workers=1)
    try:
        for text in TEXTS:
            assert outcome(await away.load(text)) == outcome(in_place.get(text)), text[:60]
        assert away.validations == in_place.validations == len(TEXTS) - 3
        assert away._executor is not None and type(away._executor).__name__ == "ProcessPoolExecutor"
    finally:
        await away.aclose()


async def test_a_broken_worker_is_replaced_by_a_thread() -> None:
    """The worker killed: the next new document is still loaded, in a thread, with the same outcome."""
    away = DocumentCache(SCHEMA, workers=1)
    try:
        await away.load(EXAMPLES[0])
        for pid in list(away._executor._processes):  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
        loaded = await away.load(TEXTS[-5])
        assert outcome(loaded) == outcome(DocumentCache(SCHEMA).get(TEXTS[-5]))
        assert away.workers == 0
    finally:
        await away.aclose()


# -- what a stream of new texts leaves behind (issue 25) ------------------------------------


def test_a_text_seen_once_is_not_kept_a_second_sight_keeps_it() -> None:
    """Texts seen once wait in a small window and are let go; a text seen twice is kept, with its plan, and
    validated once."""
    cache, planner = DocumentCache(SCHEMA, window=4), Planner(SCHEMA)
    once = [cache.get(f"{{ book(id: {i}) {{ id }} }}") for i in range(1, 21)]
    plans = [weakref.ref(plan(planner, document)) for document in once]  # type: ignore[arg-type]
    seen_once = [weakref.ref(document) for document in once]
    del once
    gc.collect()
    assert sum(ref() is not None for ref in seen_once) == 4  # the window: the last four
    assert sum(ref() is not None for ref in plans) == 4  # a plan goes with its document
    text = "{ book(id: 1) { title } }"
    first, validations = cache.get(text), cache.validations
    for _ in range(30):
        cache.get(f"{{ book(id: 2) {{ id }} }} query Other{_} {{ book(id: 3) {{ id }} }}")  # the window moves on
    assert cache.get(text) is not first and cache.validations == validations + 31  # seen once: let go
    kept = cache.get(text)
    for _ in range(30):
        cache.get(f"{{ book(id: 4) {{ id }} }} query Another{_} {{ book(id: 5) {{ id }} }}")
    assert cache.get(text) is kept and plan(planner, kept) is plan(planner, kept)  # seen twice: kept


def plan(planner: Planner, document: Document) -> Plan:
    operation = document.operation(None)
    assert not isinstance(operation, GraphQLError)
    variables = get_variable_values(SCHEMA, (), {})
    assert isinstance(variables, VariableValues)
    found = planner.plan(document, operation, variables)
    assert found is not None
    return found


async def test_new_texts_leave_the_heap_the_collector_walks_as_it_was(shop: Shop) -> None:
    """100 new texts of the heaviest accepted document through a running gateway: each is answered, and what the
    cyclic collector must walk afterwards (the app's startup heap is set aside) grew by less than 10 of them would."""
    async with running_gateway(shop) as (client, _):
        await client.post("/graphql", json={"query": HEAVY})  # the first book read and kept, the caches warm
        gc.collect()
        before = len(gc.get_objects())
        for start in range(0, 100, 4):
            answers = await asyncio.gather(*(client.post("/graphql", json={"query": f"{HEAVY}\n# {n}"})
                                             for n in range(start, start + 4)))
            assert all(a.status_code == 200 and a.json()["data"]["book"]["id"] == "1" for a in answers)
        gc.collect()
        grown = len(gc.get_objects()) - before
    one = 3100  # objects of one such document's AST as graphql-core parses it (tokens included)
    assert grown < 10 * one, f"{grown} more objects for the collector to walk"  # the window holds 8
