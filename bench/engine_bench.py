"""In-process cost of the engine: one customer's order history (20 orders, 3 items each,
about 60 books and their authors, payments, shipments) executed over already-fetched data,
by the planned engine and by graphql-core's reference execution (strawberry's resolvers and
DataLoaders), per query. No HTTP, no services: the entity source answers from memory, parsing
each payload as it does for a real answer (what the engine does with cached data).

    .venv/bin/python bench/engine_bench.py [--n 2000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
from graphql.execution.values import get_variable_values

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import executable_schema  # noqa: E402
from gateway.context import RequestContext  # noqa: E402
from gateway.documents import DocumentCache  # noqa: E402
from gateway.execute import execute_plan  # noqa: E402
from gateway.plan import Planner  # noqa: E402
from gateway.relations import Loaders  # noqa: E402
from gateway.source import Binding, Reader  # noqa: E402
from gateway.errors import format_errors  # noqa: E402
from gateway.pipeline import execute_reference  # noqa: E402
from schema import Query  # noqa: E402

HISTORY = """query History($id: ID!) { customer(id: $id) { name orders(first: 20) { totalCount
  nodes { id status placedAt total { amount currency } items { quantity book { title author { name } } }
          payment { status } shipment { status carrier } } } } }"""


def _money(cents: int) -> dict[str, str]:
    return {"amount": f"{cents // 100}.{cents % 100:02d}", "currency": "EUR"}


def dataset() -> dict[str, dict[Any, dict[str, Any]]]:
    orders = [{"id": 1000 + i, "customerId": 7, "status": "SHIPPED", "placedAt": f"2026-03-{1 + i:02d}T10:00:00Z",
               "total": _money(2000 + i), "version": 1,
               "items": [{"bookId": 1 + (i * 3 + j) % 58, "quantity": 1 + j, "unitPrice": _money(999),
                          "titleAtPurchase": f"T{i}.{j}"} for j in range(3)]} for i in range(20)]
    return {
        "customer": {7: {"id": 7, "name": "Yara Kowalski", "email": "y@example.com", "tier": "gold", "version": 3}},
        "orderPage": {7: {"customerId": 7, "data": orders, "nextCursor": "b3JkZXI6MTAxOQ", "totalCount": 21}},
        "book": {b: {"id": b, "title": f"Book {b}", "isbn": f"978-{b:09d}", "price": _money(1500 + b),
                     "publishedYear": 2001, "version": 2, "authorId": 1 + b % 55} for b in range(1, 59)},
        "author": {a: {"id": a, "name": f"Author {a}", "bio": "…", "version": 1} for a in range(1, 56)},
        "payment": {o["id"]: {"id": o["id"], "orderId": o["id"], "amount": o["total"], "method": "card",
                              "status": "CAPTURED", "version": 1} for o in orders},
        "shipment": {o["id"]: {"id": o["id"], "orderId": o["id"], "carrier": "DHL", "trackingNumber": "TR",
                               "status": "DELIVERED", "estimatedDelivery": "2026-04-01T00:00:00Z", "version": 2}
                     for o in orders},
    }


class MemoryReader(Reader):
    """A reader over payloads already fetched: parses each, as the entity source does."""

    def __init__(self, data: dict[str, dict[Any, dict[str, Any]]]) -> None:
        self.data = data
        self.caller = None  # staff-like: the bench reads every customer's data
        # No kept answers (gateway/memo.py): each query is shaped, which is what is measured.
        self.source = SimpleNamespace(memos=None)

    async def read(self, binding: Binding, keys: list[Any], query: str = "") -> dict[Any, Any]:
        return self.peek(binding, keys, query)

    def peek(self, binding: Binding, keys: list[Any], query: str = "") -> dict[Any, Any]:
        """As the entity source answers a warm query: at once, without an await."""
        table = self.data[binding.entity]
        return {k: binding.parse(table[k]) if k in table else None for k in keys}


async def run(n: int, profile: bool) -> None:
    schema = executable_schema(Query)
    documents, planner = DocumentCache(schema._schema), Planner(schema._schema)
    data = dataset()
    variables = {"id": "7"}

    async def planned() -> bytes:
        document = documents.get(HISTORY)
        operation = document.operation(None)
        values = get_variable_values(schema._schema, operation.variable_definitions, variables)  # type: ignore[union-attr]
        plan = planner.plan(document, operation, values)  # type: ignore[arg-type]
        out, errors, _ = await execute_plan(plan, values, MemoryReader(data))  # type: ignore[arg-type]
        assert not errors
        return orjson.dumps({"data": out})

    async def reference() -> bytes:
        reader = MemoryReader(data)
        context = RequestContext(None, reader, Loaders(reader))  # type: ignore[arg-type]
        result = await execute_reference(schema, documents.get(HISTORY), variables, None, context)
        assert not result.errors, format_errors(result.errors)
        return orjson.dumps({"data": result.data})

    assert await planned() == await reference(), "the two executors disagree"
    results = {}
    for name, run_one in (("planned", planned), ("reference", reference)):
        for _ in range(50):
            await run_one()
        profiler = cProfile.Profile() if profile and name == "planned" else None
        started = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(n):
            await run_one()
        if profiler:
            profiler.disable()
        results[name] = (time.process_time() - started) / n * 1000
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    print(f"order history over fetched data ({n} runs each), CPU per query:")
    print(f"  planned engine     {results['planned']:.2f} ms")
    print(f"  reference (graphql-core + strawberry resolvers) {results['reference']:.2f} ms")
    print(f"  ratio planned/reference {results['planned'] / results['reference']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="cProfile the planned runs (top 15 by own time)")
    args = parser.parse_args()
    asyncio.run(run(args.n, args.profile))


if __name__ == "__main__":
    main()
