"""The hostile catalogue against a running gateway (uvicorn, real ports, the six services
behind it), while another client measures /healthz: each hostile request's status, code,
time and the upstream calls it caused, then /healthz latency (p50/p99/max) at rest and
under the hostile load.

    .venv/bin/python bench/hostile_bench.py [--seconds 10] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _harness import Stack, clear_stats, fetch_stats, summary  # noqa: E402
from test_front_door import CATALOGUE, HEAVY  # noqa: E402

EXCLUDED = {"/events", "/_meta", "/healthz"}

# Beyond the tests' catalogue: the slowest document to validate that is within every limit
# (it is accepted and runs), and a GET mutation.
EXTRA: dict[str, tuple[dict[str, Any], int, str]] = {
    "heaviest-valid-document": ({"json": {"query": HEAVY}}, 200, "-"),
    "get-mutation": ({"method": "GET", "params": {"query": "mutation { placeOrder { id } }"}}, 405,
                     "METHOD_NOT_ALLOWED"),
}


async def fire(client: httpx.AsyncClient, url: str, request: dict[str, Any], salt: int = 0) -> httpx.Response:
    request = dict(request)
    method = request.pop("method", "POST")
    if salt and "json" in request and isinstance(request["json"], dict) and "query" in request["json"]:
        # A new text each time: the document cache must not answer it (a worst case per request).
        request["json"] = {**request["json"], "query": request["json"]["query"] + " " * salt}
    if method == "GET":
        return await client.get(url, **request)
    return await client.post(url, **request)


async def catalogue_table(client: httpx.AsyncClient, url: str, stack: Stack) -> list[dict[str, Any]]:
    rows = []
    for name, (request, _, _) in {**CATALOGUE, **EXTRA}.items():
        await clear_stats(client, stack.service_urls.values())
        started = time.perf_counter()
        response = await fire(client, url, request)
        elapsed = (time.perf_counter() - started) * 1000
        try:
            errors = response.json().get("errors") or []
        except ValueError:
            errors = [{"extensions": {"code": "non-JSON answer"}}]
        await asyncio.sleep(0.05)  # the services record a request when it ends
        stats = await fetch_stats(client, stack.service_urls)
        calls = sum(1 for reqs in stats.values() for r in reqs if r["route"] not in EXCLUDED)
        rows.append({"request": name, "status": response.status_code,
                     "code": errors[0]["extensions"]["code"] if errors else "-", "upstreamCalls": calls,
                     "ms": round(elapsed, 1)})
    return rows


async def health(url: str, until: asyncio.Event, interval: float = 0.01) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=10) as client:
        while not until.is_set():
            started = time.perf_counter()
            (await client.get(url)).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(interval)
    return latencies


async def hostile_load(url: str, seconds: float, clients: int) -> int:
    requests = [r for r, _, _ in {**CATALOGUE, **EXTRA}.values()]
    deadline = time.monotonic() + seconds
    sent = 0

    async def one_client(index: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(timeout=30) as client:
            salt = index * 1_000_000
            while time.monotonic() < deadline:
                for request in requests:
                    salt += 1
                    await fire(client, url, request, salt % 4000 + 1)
                    sent += 1

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return sent


async def loop_lag(client: httpx.AsyncClient, gateway: str) -> dict[str, float]:
    """The gateway's event-loop lag histogram (cumulative counts by bucket `le`) from /metrics."""
    text = (await client.get(f"{gateway}/metrics")).text
    pattern = r'bookvault_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)'
    return {match.group(1): float(match.group(2)) for match in re.finditer(pattern, text)}


async def main(seconds: float, clients: int) -> None:
    with Stack() as stack:
        url, health_url = f"{stack.gateway_url}/graphql", f"{stack.gateway_url}/healthz"
        async with httpx.AsyncClient(timeout=30) as client:
            rows = await catalogue_table(client, url, stack)
        print(f"{'request':34} {'status':>6} {'code':26} {'calls':>5} {'ms':>8}")
        for row in rows:
            print(f"{row['request']:34} {row['status']:>6} {row['code']:26} {row['upstreamCalls']:>5} {row['ms']:>8}")

        stop = asyncio.Event()
        idle = asyncio.create_task(health(health_url, stop))
        await asyncio.sleep(min(5.0, seconds / 2))
        stop.set()
        at_rest = await idle

        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=10) as client:
            before = await loop_lag(client, stack.gateway_url)
        probe = asyncio.create_task(health(health_url, stop))
        sent = await hostile_load(url, seconds, clients)
        stop.set()
        loaded = await probe
        async with httpx.AsyncClient(timeout=10) as client:
            after = await loop_lag(client, stack.gateway_url)
        lag = {bucket: int(after[bucket] - before.get(bucket, 0)) for bucket in after}
        total = lag.get("+Inf", 0)
        print(json.dumps({"healthzAtRest": summary(at_rest), "healthzUnderHostileLoad": summary(loaded),
                          "hostileRequests": sent, "hostileClients": clients, "seconds": seconds,
                          # the gateway's own view: 20 ms timer wake-ups, and how many were late by more than
                          # 50 ms / 100 ms (something held the loop, or the process waited for a CPU)
                          "loopLagUnderHostileLoad": {"wakeups": total, "over50ms": total - lag.get("0.05", 0),
                                                      "over100ms": total - lag.get("0.1", 0),
                                                      "over250ms": total - lag.get("0.25", 0)}}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.clients))
