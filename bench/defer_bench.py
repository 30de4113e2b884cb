"""@defer on the order page with a slow shipping service: when the first part arrives, and
when the whole answer does, against the same query without @defer.

    .venv/bin/python bench/defer_bench.py [--n 20] [--latency-ms 500]

Starts the six services (--admin, fresh data) and the gateway on free ports, entity TTLs 0
(every request reads the services), slows the shipping service's /shipments by
--latency-ms, and runs the order page for --n orders, one request at a time, each way."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import STAFF, Stack, set_faults, summary, ttl_env  # noqa: E402

FIELDS = "shipment { carrier trackingNumber } items { book { stock { available } } }"
PLAIN = f"query($id: ID!) {{ order(id: $id) {{ id status customer {{ name }} {FIELDS} }} }}"
DEFERRED = f"query($id: ID!) {{ order(id: $id) {{ id status customer {{ name }} ... @defer {{ {FIELDS} }} }} }}"
ACCEPT = "multipart/mixed;deferSpec=20220824, application/json"


async def timed(client: httpx.AsyncClient, url: str, query: str, order: int) -> tuple[float, float]:
    """Milliseconds to the first part (its closing delimiter; a JSON answer: its end) and to
    the end of the answer, which must hold the shipment (the slow service's data)."""
    started = time.perf_counter()
    first = None
    body = b""
    async with client.stream("POST", url, json={"query": query, "variables": {"id": str(order)}},
                             headers={"accept": ACCEPT, **STAFF}) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            body += chunk
            if first is None and b"\r\n---" in body[2:]:
                first = time.perf_counter()
    done = time.perf_counter()
    if b'"trackingNumber"' not in body:
        raise SystemExit(f"order {order}: no shipment in the answer: {body[:300]!r}")
    return ((first or done) - started) * 1000, (done - started) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--latency-ms", type=int, default=500)
    args = parser.parse_args()
    with Stack(env=ttl_env(0)) as stack:
        url = f"{stack.gateway_url}/graphql"
        async with httpx.AsyncClient(timeout=30) as client:
            await set_faults(client, [stack.service_urls["shipping"]], {"latencyMs": args.latency_ms,
                                                                         "paths": ["/shipments"]})
            results = {}
            for name, query in (("plain", PLAIN), ("deferred", DEFERRED)):
                await timed(client, url, query, 4850)  # warm: the document parsed and planned
                runs = [await timed(client, url, query, 4800 + i) for i in range(args.n)]
                results[name] = {"first_part": summary([r[0] for r in runs]), "whole": summary([r[1] for r in runs])}
    print(json.dumps({"latency_ms": args.latency_ms, **results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
