"""Live updates under load (README, "Subscriptions"): N SSE subscribers (graphql-sse) on one
gateway, spread over `--orders` orders; each order is PATCHed through its transitions at
the orders service, one change at a time. Reports, from the PATCH sent to each message
received, p50/p99 per message and per change (to its last subscriber), the gateway's RSS
per subscriber (RSS with the subscribers minus before, / N) and its CPU per change.

    .venv/bin/python bench/live_bench.py [--subscribers 2000] [--orders 10]

The clients are raw asyncio sockets (a few KiB each), in this process; the services and
the gateway are child processes (bench/_harness.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
from _harness import BENCH_SECRET, Stack, cpu_seconds, percentile

from gateway.auth import mint

QUERY = "subscription($id: ID!) { orderUpdated(id: $id) { id status version customer { name } } }"
STEPS = ("PAID", "SHIPPED", "DELIVERED")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Subscriber:
    """One SSE stream on a raw socket: the time each `next` arrived, with its version."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.first = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self, host: str, port: int, order_id: int, token: str) -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        body = json.dumps({"query": QUERY, "variables": {"id": str(order_id)}}).encode()
        writer.write(f"POST /graphql HTTP/1.1\r\nHost: {host}\r\naccept: text/event-stream\r\n"
                     f"content-type: application/json\r\nauthorization: Bearer {token}\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await reader.readuntil(b"\r\n\r\n")
        while line := await reader.readline():
            if line.startswith(b"data: {"):
                payload = json.loads(line[6:])
                self.arrivals.append((time.perf_counter(), payload["data"]["orderUpdated"]["version"]))
                self.first.set()


async def placed_orders(client: httpx.AsyncClient, orders_url: str, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for start in range(1, 20_000, 100):
        page = (await client.get(f"{orders_url}/orders", params={"ids": ",".join(map(str, range(start, start + 100)))})).json()
        found += [o for o in page["data"] if o["status"] == "PLACED"]
        if len(found) >= count:
            return found[:count]
    raise SystemExit(f"only {len(found)} PLACED orders in the data")


async def bench(stack: Stack, subscribers: int, orders_count: int) -> dict[str, Any]:
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    pid = stack.pid("gateway")
    async with httpx.AsyncClient(timeout=30) as client:
        orders = await placed_orders(client, stack.service_urls["orders"], orders_count)
        before = rss_kib(pid)
        subs = [Subscriber() for _ in range(subscribers)]
        started = time.perf_counter()
        for n, sub in enumerate(subs):
            order = orders[n % len(orders)]
            sub.task = asyncio.create_task(sub.run(host, int(port), order["id"], mint(BENCH_SECRET, f"c{order['customerId']}",
                                                                                      customer=order["customerId"])))
            if n % 200 == 199:
                await asyncio.sleep(0.05)  # let the gateway accept in waves
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in subs)), 300)
        subscribe_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        per_message, per_change = [], []
        cpu_before = cpu_seconds(pid) or 0.0
        changes = 0
        for status in STEPS:
            for i, order in enumerate(orders):
                group = subs[i::len(orders)]
                sent = time.perf_counter()
                answer = await client.patch(f"{stack.service_urls['orders']}/orders/{order['id']}", json={"status": status})
                version = answer.json()["version"]
                deadline = time.perf_counter() + 10
                while any(s.arrivals[-1][1] < version for s in group) and time.perf_counter() < deadline:
                    await asyncio.sleep(0.002)
                arrived = [next((t for t, v in s.arrivals if v == version), None) for s in group]
                got = [t - sent for t in arrived if t is not None]
                per_message += got
                per_change.append(max(got) if len(got) == len(group) else float("inf"))
                changes += 1
        cpu = (cpu_seconds(pid) or 0.0) - cpu_before
        for sub in subs:
            assert sub.task is not None
            sub.task.cancel()
    ms = 1000.0
    return {
        "subscribers": subscribers, "orders": len(orders), "changes": changes,
        "subscribe_all_s": round(subscribe_s, 2),
        "message_p50_ms": round(percentile(per_message, 50) * ms, 1),  # type: ignore[operator]
        "message_p99_ms": round(percentile(per_message, 99) * ms, 1),  # type: ignore[operator]
        "last_subscriber_p50_ms": round(percentile(per_change, 50) * ms, 1),  # type: ignore[operator]
        "last_subscriber_p99_ms": round(percentile(per_change, 99) * ms, 1),  # type: ignore[operator]
        "messages_missing": subscribers * len(STEPS) - len(per_message),
        "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
        "rss_per_subscriber_kib": round((after - before) / subscribers, 1),
        "cpu_ms_per_change": round(cpu / changes * ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--orders", type=int, default=10)
    args = parser.parse_args()
    with Stack(env={"BOOKVAULT_LIVE_MAX": str(args.subscribers + 100)}) as stack:
        print(json.dumps(asyncio.run(bench(stack, args.subscribers, args.orders)), indent=2))


if __name__ == "__main__":
    main()
